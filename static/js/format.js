// Time formatting for both pages, built on Intl so the browser's time zone
// database does the daylight-saving arithmetic for us.
//
// Two kinds of dates travel around:
//   - instants: RFC 3339 strings in UTC from the server ("2026-12-01T08:00:00Z");
//   - date keys: "YYYY-MM-DD" calendar dates, always tied to a named zone
//     (the doctor's on the wire, the patient's in the patient's week view).
// Labels are English on purpose: the whole interface is English, and mixing an
// English sentence with a browser-locale date reads badly.

const LOCALE = "en-GB";

/** The browser's IANA time zone, e.g. "Europe/London". */
export function browserZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

// Creating Intl formatters is slow; pages format hundreds of slots per render.
const cache = new Map();
function formatter(zone, options) {
  const key = zone + JSON.stringify(options);
  let f = cache.get(key);
  if (!f) {
    f = new Intl.DateTimeFormat(LOCALE, { timeZone: zone, ...options });
    cache.set(key, f);
  }
  return f;
}

function parts(instant, zone, options) {
  const out = {};
  for (const p of formatter(zone, options).formatToParts(new Date(instant))) out[p.type] = p.value;
  return out;
}

/** The calendar date ("YYYY-MM-DD") of an instant in a zone. */
export function dateKey(instant, zone) {
  const p = parts(instant, zone, { year: "numeric", month: "2-digit", day: "2-digit" });
  return `${p.year}-${p.month}-${p.day}`;
}

/** "09:00": 24-hour clock time of an instant in a zone. */
export function timeHM(instant, zone) {
  return formatter(zone, { hour: "2-digit", minute: "2-digit", hourCycle: "h23" }).format(new Date(instant));
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

/**
 * Every time a patient reads outside the grid (hold panel, confirmation, My appointments,
 * notices) goes through here, so that how a patient is told a time (their zone's label, the
 * clinic's local time beside it when it differs, the locale's 12- or 24-hour clock) is decided
 * in one place. `doctorZone` is the doctor's IANA zone.
 */
export function patientWhen(instant, patientZone, doctorZone) {
  void doctorZone;
  return shortDateTime(instant, patientZone);
}
