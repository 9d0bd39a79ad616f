// One day of a doctor's dashboard, as pure state (no DOM, no socket). It
// follows the same version rules as a calendar (docs/protocol.md, "Rooms"):
// dashboard_deltas are never merged, so each must be exactly version + 1; a
// gap means "watch_dashboard again" (dashboards are not resumed, a fresh
// dashboard replaces the day).

import { addDays, dateKey } from "./format.js";

const ACTIVE = new Set(["pending", "booked", "arrived", "fulfilled", "noshow"]);

export class DayBook {
  constructor(doctorId, date) {
    this.doctorId = doctorId;
    this.date = date; // the doctor's local date
    this.timezone = null;
    this.version = null;
    this.awaitingReply = true; // deltas are dropped until the dashboard arrives
    this.appointments = new Map(); // id -> appointment starting on `date`
    this.slots = new Map(); // id -> slot starting on `date`
    this.conflicts = new Set(); // slot ids the schedule no longer offers
    this.reasons = new Map(); // slot id -> why it is blocked (staff only), when one was given
  }

  applyDashboard(dashboard) {
    this.timezone = dashboard.timezone;
    this.version = dashboard.version;
    this.appointments = new Map(dashboard.appointments.map((a) => [a.id, a]));
    this.slots = new Map(dashboard.slots.map((s) => [s.id, s]));
    this.conflicts = new Set(dashboard.conflicts);
    this.reasons = new Map((dashboard.blocks ?? []).map((b) => [b.slot_id, b.reason]));
    this.awaitingReply = false;
  }

  /** Returns "applied", "stale", "ignored" (dashboard pending) or "gap" (watch again). */
  applyDelta(delta) {
    if (this.awaitingReply || this.version === null) return "ignored";
    if (delta.version <= this.version) return "stale";
    if (delta.version !== this.version + 1) {
      this.awaitingReply = true;
      return "gap";
    }
    // A delta covers the doctor's whole calendar; keep what falls on our date.
    for (const appointment of delta.appointments) {
      if (this.appointments.has(appointment.id) || this.onDate(appointment.start)) {
        this.appointments.set(appointment.id, appointment);
      }
    }
    // A slot in a delta has the reason the delta gives it, or none (an unblock drops it).
    const reasons = new Map((delta.blocks ?? []).map((b) => [b.slot_id, b.reason]));
    for (const slot of delta.slots) {
      if (this.slots.has(slot.id) || this.onDate(slot.start)) {
        this.slots.set(slot.id, slot);
        if (reasons.has(slot.id)) this.reasons.set(slot.id, reasons.get(slot.id));
        else this.reasons.delete(slot.id);
      }
    }
    for (const id of delta.removed) {
      this.slots.delete(id);
      this.conflicts.delete(id); // a removed slot is no longer a conflict
    }
    for (const id of delta.conflicts) if (this.slots.has(id)) this.conflicts.add(id);
    this.version = delta.version;
    return "applied";
  }

  onDate(instant) {
    return this.timezone !== null && dateKey(instant, this.timezone) === this.date;
  }

  /**
   * The day's rows, in time order: each slot with the appointment that holds
   * it (the latest one that is not cancelled) and whether it is a conflict.
   */
  rows() {
    const bySlot = new Map();
    for (const appointment of this.appointments.values()) {
      if (!ACTIVE.has(appointment.status)) continue;
      const known = bySlot.get(appointment.slot_id);
      if (!known || appointment.id > known.id) bySlot.set(appointment.slot_id, appointment);
    }
    const rows = [...this.slots.values()].map((slot) => ({
      slot,
      appointment: bySlot.get(slot.id) ?? null,
      conflict: this.conflicts.has(slot.id),
      reason: slot.status === "busy-unavailable" ? (this.reasons.get(slot.id) ?? null) : null,
    }));
    return rows.sort((a, b) => Date.parse(a.slot.start) - Date.parse(b.slot.start));
  }
}

/** Whether an appointment occupies its slot for good (what a day's "booked" count counts). */
export const countsAsBooked = (appointment) => ["booked", "arrived", "fulfilled", "noshow"].includes(appointment.status);

/**
 * The seven days a doctor's dashboard shows as tabs: today and the next six in
 * the doctor's zone (the browser's until the doctor's is known), and the one
 * chosen.
 */
export class DashboardDays {
  constructor(zone) {
    this.zone = zone;
    this.dates = []; // the doctor's local dates shown as tabs
    this.selected = null;
  }

  /** Adopt the doctor's zone; false when it is unknown or already the one. */
  setZone(zone) {
    if (!zone || zone === this.zone) return false;
    this.zone = zone;
    return true;
  }

  /** Today and the next six days; the chosen day stays if still shown, else today. */
  reset(now = Date.now()) {
    const today = dateKey(now, this.zone);
    this.dates = Array.from({ length: 7 }, (_, i) => addDays(today, i));
    if (!this.dates.includes(this.selected)) this.selected = today;
  }

  get today() {
    return this.dates[0];
  }

  /** The date a key moves the choice to (the ARIA tabs pattern), or null for a key that does not move it. */
  step(key) {
    const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -Infinity, End: Infinity };
    if (!(key in moves)) return null;
    const index = this.dates.indexOf(this.selected);
    return this.dates[Math.min(this.dates.length - 1, Math.max(0, index + moves[key]))];
  }
}

/** Each date's appointments (from dashboards, day lists and deltas, merged by id), for the tabs' "n booked". */
export class BookedCounts {
  constructor() {
    this.byDate = new Map(); // date -> Map(appointment id -> appointment)
  }

  remember(appointments, zone) {
    for (const appointment of appointments) {
      const date = dateKey(appointment.start, zone);
      if (!this.byDate.has(date)) this.byDate.set(date, new Map());
      this.byDate.get(date).set(appointment.id, appointment);
    }
  }

  booked(date) {
    return [...(this.byDate.get(date)?.values() ?? [])].filter(countsAsBooked).length;
  }
}
