// The words of the doctor's live feed, as pure functions (no DOM): one line
// per dashboard_delta, e.g. "Tue 09:30 booked by Alice Martin" (or "booked for",
// when the front desk booked for her) or "Schedule changed:
// 2 bookings are now outside it".

import { dateKey, dayShort, timeHM } from "./format.js";

const KIND_WORDS = {
  // By the patient themselves, or for them (the front desk, a service's API key).
  "slot.held": (who, actorRole) => `held ${actorRole === "patient" ? "by" : "for"} ${who}`,
  "slot.booked": (who, actorRole) => `booked ${actorRole === "patient" ? "by" : "for"} ${who}`,
  "hold.released": (who, actorRole) => (actorRole === "patient" ? `hold released by ${who}` : `hold released for ${who}`),
  "hold.expired": () => "hold expired",
  "appointment.cancelled": (who, actorRole) => (actorRole === "patient" ? `cancelled by ${who}` : "cancelled"),
  "appointment.rescheduled": () => "rescheduled",
  "appointment.arrived": () => "arrived",
  "appointment.fulfilled": () => "fulfilled",
  "appointment.noshow": () => "no-show",
  "appointment.unmarked": () => "mark undone",
  "slot.blocked": () => "blocked",
  "slot.unblocked": () => "unblocked",
  "slots.opened": () => "new slots opened",
  "slots.closed": () => "slots closed",
  "slots.conflict": () => "conflict with the schedule",
  "slots.conflict_resolved": () => "conflict resolved",
  "schedule.changed": () => "schedule changed",
  "doctor.created": () => "added to the directory",
  "doctor.updated": () => "directory entry updated",
};

/** A delta's feed line; times in `zone`, with the weekday unless the date is `today`. */
export function feedText(delta, zone, today) {
  // A schedule change carries several kinds (closed, opened, conflict): one line says it.
  // So does a retirement (holds released, slots closed, bookings kept as conflicts).
  if (delta.kinds.includes("doctor.retired")) {
    const n = delta.conflicts.length;
    return n === 0 ? "Retired: no more appointments offered" : `Retired: ${n} ${n === 1 ? "booking needs" : "bookings need"} rescheduling or cancelling`;
  }
  if (delta.kinds.includes("schedule.changed")) {
    const n = delta.conflicts.length;
    return n === 0 ? "Schedule changed" : `Schedule changed: ${n} ${n === 1 ? "booking is" : "bookings are"} now outside it`;
  }
  // A range blocked or opened again: how many times, from when, and the reason given.
  for (const [kind, verb] of [["slots.blocked", "Blocked"], ["slots.unblocked", "Opened again"]]) {
    if (!delta.kinds.includes(kind) || delta.slots.length === 0) continue;
    const first = delta.slots.reduce((a, b) => (Date.parse(a.start) <= Date.parse(b.start) ? a : b));
    const date = dateKey(first.start, zone);
    const n = delta.slots.length;
    const reason = delta.blocks?.[0]?.reason;
    return `${verb} ${n} ${n === 1 ? "slot" : "slots"} from ${date === today ? "" : `${dayShort(date)} `}${timeHM(first.start, zone)}${reason ? `: ${reason}` : ""}`;
  }
  const [actorRole, actorSubject] = (delta.actor ?? "").split(/:(.*)/s);
  const appointment = delta.appointments[0];
  // The patient's display name (their token's `name`) when known, else their subject.
  const who = appointment?.patient_name ?? appointment?.patient_id ?? actorSubject ?? "someone";
  const verbs = delta.kinds.map((kind) => (KIND_WORDS[kind] ?? (() => kind.replace(/[._]/g, " ")))(who, actorRole));
  const subject = appointment ?? (delta.slots.length === 1 ? delta.slots[0] : null);
  let when = "";
  if (subject) {
    const date = dateKey(subject.start, zone);
    when = `${date === today ? "" : `${dayShort(date)} `}${timeHM(subject.start, zone)} `;
  }
  return `${when}${verbs.join(", ") || "calendar updated"}`;
}
