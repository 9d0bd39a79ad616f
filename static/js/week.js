// The week the patient page shows, as pure state (no DOM, no socket): whose
// week, from which of the patient's local dates, the Calendar that follows it
// (calendar.js: the version rules), and what each slot says to the patient.

import { Calendar } from "./calendar.js";
import { addDays } from "./format.js";

const GONE = new Set(["busy", "busy-unavailable"]); // statuses that leave the patient's view

export class Week {
  /** `today` is the patient's local date ("YYYY-MM-DD"); no week starts before it. */
  constructor(today) {
    this.today = today;
    this.start = today; // the patient's local date the week starts on
    this.doctor = null; // the doctor whose week is shown
    this.calendar = null; // Calendar of the shown doctor and week
  }

  /** Show another doctor, from this week. False when that doctor is already shown. */
  select(doctor) {
    if (this.doctor?.id === doctor.id) return false;
    this.doctor = doctor;
    this.start = this.today;
    return true;
  }

  /** Move the week by `days`. False when it would start before today. */
  move(days) {
    const next = addDays(this.start, days);
    if (next < this.today) return false;
    this.start = next;
    return true;
  }

  /** A fresh Calendar for the shown doctor and week; it replaces the previous one. */
  open() {
    // The doctor's local dates that can hold a slot of the patient's week: zones
    // are at most 26 hours apart, so two days either side is always enough.
    this.calendar = new Calendar(this.doctor.id, addDays(this.start, -2), addDays(this.start, 9));
    return this.calendar;
  }

  /** The week's seven dates, in the patient's zone. */
  days() {
    return Array.from({ length: 7 }, (_, i) => addDays(this.start, i));
  }

  get end() {
    return addDays(this.start, 6);
  }

  /** Show the week that has the patient's date `key`, keeping weeks aligned on today. */
  showDate(key) {
    const days = Math.round((Date.parse(key) - Date.parse(this.today)) / 86_400_000);
    const next = addDays(this.today, Math.max(0, Math.floor(days / 7)) * 7);
    if (next === this.start) return false;
    this.start = next;
    return true;
  }

  /** Whether this is the first week that may be shown (no going back). */
  get atToday() {
    return this.start <= this.today;
  }
}

/**
 * What a slot says to the patient: `spoken` (the end of its accessible name),
 * `tag` (the short visible label), whether it can be held now, and whether it
 * `goes` from view (booked, blocked, already started). `mine`: the patient's
 * own hold is on it; `booked`: the patient's own appointment is, which stays in
 * view, marked in words, so the week shows where their visit is.
 */
export function describeSlot(slot, calendar, mine, booked = false) {
  const [spoken, tag] = words(slot, calendar, mine, booked);
  return {
    spoken,
    tag,
    bookable: slot.status === "free" && spoken === "available",
    goes: (GONE.has(slot.status) && spoken !== "your appointment") || spoken === "already started",
  };
}

function words(slot, calendar, mine, booked) {
  if (booked && slot.status === "busy") return ["your appointment", "Your appointment"];
  if (slot.status === "busy-tentative") return mine ? ["held by you", "Your hold"] : ["held by someone", "Held"];
  if (slot.status === "busy") return ["taken", ""];
  if (slot.status === "busy-unavailable") return ["unavailable", ""];
  const reason = calendar.unbookableReason(slot);
  if (reason === "started") return ["already started", ""];
  if (reason === "too_late") return ["too soon to book", "Too soon"];
  if (reason === "outside_horizon") return ["not bookable yet", "Not yet"];
  return ["available", ""];
}
