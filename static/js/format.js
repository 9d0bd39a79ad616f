// Time formatting for both pages, built on Intl so the browser's time zone
// database does the daylight-saving arithmetic for us.
//
// Two kinds of dates travel around:
//   - instants: RFC 3339 strings in UTC from the server ("2026-12-01T08:00:00Z");
//   - date keys: "YYYY-MM-DD" calendar dates, always tied to a named zone
//     (the doctor's on the wire, the patient's in the patient's week view).
// Labels are English on purpose: the whole interface is English, and mixing an
// English sentence with a browser-locale date reads badly. The clock is not a
// label: time of day follows the browser's locale (12-hour in the US, 24-hour in
// most of the world), written the English way for that clock.

const LOCALE = "en-GB";

/** Whether the browser's locale reads time of day on a 12-hour clock. */
function twelveHour() {
  const language = globalThis.navigator?.language || Intl.DateTimeFormat().resolvedOptions().locale;
  try {
    const cycle = new Intl.DateTimeFormat(language, { hour: "numeric" }).resolvedOptions().hourCycle;
    return cycle === "h12" || cycle === "h11";
  } catch {
    return false; // a language tag Intl does not know: the 24-hour clock reads everywhere
  }
}

// "9:00 AM" (en-US) or "09:00" (en-GB): English either way, on the browser's clock.
const CLOCK = twelveHour()
  ? { locale: "en-US", options: { hour: "numeric", minute: "2-digit", hourCycle: "h12" } }
  : { locale: "en-GB", options: { hour: "2-digit", minute: "2-digit", hourCycle: "h23" } };

// Zone names in English, as the browser's English would put them ("PST" is American,
// "BST" British), or American English for a browser in another language.
const ZONE_LOCALE = (globalThis.navigator?.language || "").startsWith("en-") ? navigator.language : "en-US";

/** The browser's IANA time zone, e.g. "Europe/London". */
export function browserZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

// Creating Intl formatters is slow; pages format hundreds of slots per render.
const cache = new Map();
function formatter(zone, options, locale = LOCALE) {
  const key = locale + zone + JSON.stringify(options);
  let f = cache.get(key);
  if (!f) {
    f = new Intl.DateTimeFormat(locale, { timeZone: zone, ...options });
    cache.set(key, f);
  }
  return f;
}

function parts(instant, zone, options, locale = LOCALE) {
  const out = {};
  for (const p of formatter(zone, options, locale).formatToParts(new Date(instant))) out[p.type] = p.value;
  return out;
}

/** The calendar date ("YYYY-MM-DD") of an instant in a zone. */
export function dateKey(instant, zone) {
  const p = parts(instant, zone, { year: "numeric", month: "2-digit", day: "2-digit" });
  return `${p.year}-${p.month}-${p.day}`;
}

/** "09:00" or "9:00 AM": the time of day of an instant in a zone, on the browser's clock. */
export function timeHM(instant, zone) {
  return formatter(zone, CLOCK.options, CLOCK.locale).format(new Date(instant));
}

// Date keys are zone-free labels, so do their arithmetic and naming in UTC.
function keyToUtcDate(key) {
  const [y, m, d] = key.split("-").map(Number);
  return new Date(Date.UTC(y, m - 1, d));
}

/** The date key `days` after `key` (negative goes back). */
export function addDays(key, days) {
  const d = keyToUtcDate(key);
  d.setUTCDate(d.getUTCDate() + days);
  return d.toISOString().slice(0, 10);
}

/** "Tuesday 1 December" for a date key. */
export function dayLong(key) {
  const p = parts(keyToUtcDate(key), "UTC", { weekday: "long", day: "numeric", month: "long" });
  return `${p.weekday} ${p.day} ${p.month}`;
}

/** "Tue 1 Dec" for a date key. */
export function dayShort(key) {
  const p = parts(keyToUtcDate(key), "UTC", { weekday: "short", day: "numeric", month: "short" });
  return `${p.weekday} ${p.day} ${p.month}`;
}

/** "1 Dec" for a date key (week ranges). */
export function dayMonth(key) {
  const p = parts(keyToUtcDate(key), "UTC", { day: "numeric", month: "short" });
  return `${p.day} ${p.month}`;
}

/** "Tue 1 Dec 09:00" for an instant seen from a zone. */
export function shortDateTime(instant, zone) {
  return `${dayShort(dateKey(instant, zone))} ${timeHM(instant, zone)}`;
}

/** "UTC+9", "UTC+5:30", "UTC" for a zone at a given moment (offsets change with DST). */
export function utcOffset(zone, at = Date.now()) {
  const name = parts(at, zone, { timeZoneName: "shortOffset" }).timeZoneName || "GMT";
  const offset = name.replace("GMT", "");
  return offset && offset !== "+0" ? `UTC${offset}` : "UTC";
}

/** Whether two zones show the same wall-clock time at a moment (e.g. Europe/Paris and Europe/Berlin). */
export function sameOffset(zoneA, zoneB, at = Date.now()) {
  return utcOffset(zoneA, at) === utcOffset(zoneB, at);
}

/** "1:05" for a countdown of milliseconds; never negative. */
export function countdown(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const minutes = Math.floor(total / 60);
  const seconds = String(total % 60).padStart(2, "0");
  return `${minutes}:${seconds}`;
}

// An offset ("GMT-8") is a number, not a name: prefer a name when Intl has one.
const OFFSET_NAME = /^(GMT|UTC)[+-]/;

function zoneNamed(zone, style, at) {
  return parts(at, zone, { timeZoneName: style }, ZONE_LOCALE).timeZoneName || "";
}

/** "Tokyo" for "Asia/Tokyo", "Buenos Aires" for "America/Argentina/Buenos_Aires": where a clinic is. */
export function zonePlace(zone) {
  return zone.split("/").pop().replaceAll("_", " ");
}

/**
 * The short label beside a time: "PST", "GMT", "BST", "CET", or the zone's
 * generic name ("Japan Time", "Los Angeles Time") where the browser's English
 * has no abbreviation for it; an offset ("UTC+9") only as the last resort.
 */
export function zoneLabel(zone, at = Date.now()) {
  for (const style of ["short", "shortGeneric"]) {
    const name = zoneNamed(zone, style, at);
    if (name && !OFFSET_NAME.test(name) && name !== "GMT+0") return name;
  }
  return utcOffset(zone, at);
}

/** The zone's name in a sentence: "Pacific Time", "Japan Standard Time", "Coordinated Universal Time". */
export function zoneName(zone, at = Date.now()) {
  for (const style of ["longGeneric", "long"]) {
    const name = zoneNamed(zone, style, at);
    if (name && !OFFSET_NAME.test(name)) return name;
  }
  return zonePlace(zone);
}

/** Minutes `zone` is ahead of UTC at a moment (negative: behind). */
export function offsetMinutes(zone, at = Date.now()) {
  const match = /([+-])(\d+)(?::(\d+))?/.exec(utcOffset(zone, at));
  if (!match) return 0;
  const minutes = Number(match[2]) * 60 + Number(match[3] ?? 0);
  return match[1] === "-" ? -minutes : minutes;
}

/** "17 hours ahead of", "30 minutes behind", "5½ hours ahead of": how far zone A is from zone B. */
export function zoneDistance(zoneA, zoneB, at = Date.now()) {
  const diff = offsetMinutes(zoneA, at) - offsetMinutes(zoneB, at);
  const size = Math.abs(diff);
  const hours = Math.floor(size / 60);
  const minutes = size % 60;
  let amount;
  if (hours === 0) amount = `${minutes} minutes`;
  else if (minutes === 30) amount = `${hours}½ hours`;
  else if (minutes) amount = `${hours} hours ${minutes} minutes`;
  else amount = hours === 1 ? "1 hour" : `${hours} hours`;
  return `${amount} ${diff > 0 ? "ahead of" : "behind"}`;
}

/**
 * Every time a patient reads outside the grid (hold panel, confirmation, My appointments,
 * notices) goes through here, so that how a patient is told a time (their zone's label, the
 * clinic's local time beside it when it differs, the locale's 12- or 24-hour clock) is decided
 * in one place. `doctorZone` is the doctor's IANA zone.
 */
export function patientWhen(instant, patientZone, doctorZone) {
  const mine = `${dayShort(dateKey(instant, patientZone))}, ${timeHM(instant, patientZone)} ${zoneLabel(patientZone, instant)}`;
  if (!doctorZone || sameOffset(patientZone, doctorZone, instant)) return mine;
  const theirDay = dateKey(instant, doctorZone);
  const day = theirDay === dateKey(instant, patientZone) ? "" : `${dayShort(theirDay)}, `;
  return `${mine} (${day}${timeHM(instant, doctorZone)} in ${zonePlace(doctorZone)})`;
}
