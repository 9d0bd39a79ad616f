// State of the doctor's schedule editor, without DOM or socket: the draft of
// what `set_schedule` will take (read back with `get_schedule`, so fields the
// editor does not show travel back unchanged), the words for a preview, and
// the clinic-time arithmetic a "block this day" needs. A date and a time typed
// by the doctor mean the clinic's wall clock, in the doctor's zone, whatever
// the browser's zone is.

export const WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/** "09:00:00" -> "09:00" (what a time input shows) and back. */
export const hhmm = (time) => (time ?? "").slice(0, 5);
export const wireTime = (value) => (value.length === 5 ? `${value}:00` : value);

/** The editor's working copy of one doctor's schedule. */
export class ScheduleDraft {
  constructor(schedule) {
    this.doctorId = schedule.doctor_id;
    this.weekly = schedule.weekly.map((b) => ({ weekday: b.weekday, start: hhmm(b.start), end: hhmm(b.end) }));
    this.overrides = schedule.overrides.map((o) => ({
      date: o.date,
      off: o.start === null,
      start: hhmm(o.start) || "09:00",
      end: hhmm(o.end) || "17:00",
    }));
    this.rules = {
      slot_minutes: schedule.slot_minutes,
      buffer_minutes: schedule.buffer_minutes,
      min_notice_minutes: schedule.min_notice_minutes,
      horizon_days: schedule.horizon_days,
    };
  }

  blocksOn(weekday) {
    return this.weekly.filter((b) => b.weekday === weekday);
  }

  addBlock(weekday) {
    const last = this.blocksOn(weekday).at(-1);
    this.weekly.push({ weekday, start: last ? last.end : "09:00", end: last ? "18:00" : "12:00" });
  }

  removeBlock(block) {
    this.weekly = this.weekly.filter((b) => b !== block);
  }

  addOverride(date) {
    this.overrides.push({ date, off: true, start: "09:00", end: "17:00" });
  }

  removeOverride(override) {
    this.overrides = this.overrides.filter((o) => o !== override);
  }

  /** The `set_schedule` (or `preview_schedule`) body; problems a person can fix are listed instead. */
  body() {
    const problems = [];
    for (const b of this.weekly) {
      if (!b.start || !b.end || b.start >= b.end) problems.push(`${WEEKDAYS[b.weekday - 1]}: the hours must end after they start.`);
    }
    for (const o of this.overrides) {
      if (!o.date) problems.push("Every date with other hours needs a date.");
      else if (!o.off && (!o.start || !o.end || o.start >= o.end)) problems.push(`${o.date}: the hours must end after they start.`);
    }
    for (const [name, value] of Object.entries(this.rules)) {
      if (!Number.isInteger(value)) problems.push(`${RULE_WORDS[name]} must be a whole number.`);
    }
    const weekly = [...this.weekly]
      .sort((a, b) => a.weekday - b.weekday || a.start.localeCompare(b.start))
      .map((b) => ({ weekday: b.weekday, start: wireTime(b.start), end: wireTime(b.end) }));
    const overrides = this.overrides
      .filter((o) => o.date)
      .sort((a, b) => a.date.localeCompare(b.date))
      .map((o) => (o.off ? { date: o.date, start: null, end: null } : { date: o.date, start: wireTime(o.start), end: wireTime(o.end) }));
    return { problems, body: { doctor_id: this.doctorId, weekly, overrides, ...this.rules } };
  }
}

export const RULE_WORDS = {
  slot_minutes: "Slot length (minutes)",
  buffer_minutes: "Break between slots (minutes)",
  min_notice_minutes: "Least notice for a booking (minutes)",
  horizon_days: "Bookable ahead (days)",
};

/** The UTC offset of `zone` at an instant, in minutes (Intl does the daylight-saving arithmetic). */
function offsetMinutes(instant, zone) {
  const p = {};
  const f = new Intl.DateTimeFormat("en-GB", {
    timeZone: zone,
    hourCycle: "h23",
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
  });
  for (const part of f.formatToParts(new Date(instant))) p[part.type] = part.value;
  const wall = Date.UTC(Number(p.year), Number(p.month) - 1, Number(p.day), Number(p.hour), Number(p.minute));
  return Math.round((wall - Math.floor(instant / 60_000) * 60_000) / 60_000);
}

/** The instant (ms) at which the clinic's wall clock in `zone` shows `dateKey` `time` ("HH:MM"). */
export function clinicInstant(dateKey, time, zone) {
  const [y, m, d] = dateKey.split("-").map(Number);
  const [hh, mm] = time.split(":").map(Number);
  const wall = Date.UTC(y, m - 1, d, hh, mm);
  let guess = wall - offsetMinutes(wall, zone) * 60_000;
  guess = wall - offsetMinutes(guess, zone) * 60_000; // once more, across a daylight-saving change
  return guess;
}

const iso = (ms) => new Date(ms).toISOString().replace(".000Z", "Z");

/** The date key after `dateKey`. */
function nextDay(dateKey) {
  const [y, m, d] = dateKey.split("-").map(Number);
  return new Date(Date.UTC(y, m - 1, d + 1)).toISOString().slice(0, 10);
}

/**
 * The [start, end) a block form means, in the clinic's zone: whole local days from
 * `dateKey` through `lastKey` (the same day when absent), or from `from` on the first
 * day until `until` on the last.
 */
export function blockRange(dateKey, { wholeDay, from, until, lastKey = null }, zone) {
  const last = lastKey || dateKey;
  if (wholeDay) return { start: iso(clinicInstant(dateKey, "00:00", zone)), end: iso(clinicInstant(nextDay(last), "00:00", zone)) };
  return { start: iso(clinicInstant(dateKey, from, zone)), end: iso(clinicInstant(last, until, zone)) };
}
