// The patient's own appointments, as pure state (no DOM, no socket). They come
// three ways: a fresh list (first load, reconnect, resync) that replaces what
// was known; appointment_events, versioned per appointment, that may repeat or
// arrive late (relayed), so only each appointment's newest applies; and the
// replies to hold, book and cancel, which carry no version and only fill in
// what events have not.

import { statusWords } from "./messages.js";

const TERMINAL = new Set(["cancelled", "fulfilled", "noshow"]);
export const DEFAULT_CANCEL_REASON = "Cancelled by patient";

export class MyAppointments {
  constructor() {
    this.byId = new Map(); // id -> appointment
    this.versions = new Map(); // id -> doctor version of the last event applied
    this.cancelledByMe = new Set(); // appointment ids this patient cancelled here
  }

  get(id) {
    return this.byId.get(id);
  }

  /** A fresh list replaces what we knew; it holds only upcoming ones, so keep the final states we saw happen live. */
  replace(list) {
    const fresh = new Map(list.map((appointment) => [appointment.id, appointment]));
    for (const [id, known] of this.byId) {
      if (!fresh.has(id) && TERMINAL.has(known.status)) fresh.set(id, known);
    }
    this.byId = fresh;
  }

  /** Apply an appointment_event. Returns null when it is not newer than what we have, else {before}. */
  applyEvent({ version, appointment }) {
    if (version <= (this.versions.get(appointment.id) ?? 0)) return null;
    this.versions.set(appointment.id, version);
    const before = this.byId.get(appointment.id);
    this.byId.set(appointment.id, appointment);
    return { before };
  }

  /** A reply's appointment (held, booked, cancelled): it does not overwrite a newer state from an event. */
  applyReply(appointment) {
    const known = this.byId.get(appointment.id);
    if (!known || known.status === "pending" || appointment.status === "cancelled") {
      this.byId.set(appointment.id, appointment);
    }
  }

  cancelledHere(id) {
    this.cancelledByMe.add(id);
  }

  /** Whether an event is the clinic cancelling a booking of ours (worth a notice). */
  clinicCancelled(before, appointment) {
    return (
      before?.status === "booked" &&
      appointment.status === "cancelled" &&
      !this.cancelledByMe.has(appointment.id) &&
      appointment.cancel_reason !== "rescheduled"
    );
  }

  /** The appointments to list, in start order. A hold that was given back or ran out is not an appointment any more. */
  shown() {
    return [...this.byId.values()]
      .filter((a) => !(a.status === "cancelled" && ["released", "hold expired"].includes(a.cancel_reason)))
      .sort((a, b) => Date.parse(a.start) - Date.parse(b.start));
  }

  badgeText(appointment) {
    if (appointment.status !== "cancelled") return statusWords(appointment.status);
    if (appointment.cancel_reason === "rescheduled") return "Rescheduled";
    if (this.cancelledByMe.has(appointment.id) || appointment.cancel_reason === DEFAULT_CANCEL_REASON) {
      return "Cancelled by you";
    }
    return "Cancelled by the clinic";
  }

  /** The clinic's reason to show under a cancelled appointment, or null. */
  clinicReason(appointment) {
    const byClinic = appointment.status === "cancelled" && this.badgeText(appointment) === "Cancelled by the clinic";
    return byClinic && appointment.cancel_reason ? appointment.cancel_reason : null;
  }
}
