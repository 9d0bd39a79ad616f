// The patient's hold, as pure state (no DOM, no socket): the pending
// appointment shown in the hold panel, the confirm in flight, and which
// expiries were already announced. The hold survives reloads and reconnects:
// it is simply the patient's pending appointment.

import { serverNow } from "./clock.js";

// The countdown ends this much before the server's expiry: our idea of the
// server's clock is only good to about a second, and a confirm sent at "0:01"
// should still reach a live hold.
const HOLD_MARGIN_MS = 1000;

/** Milliseconds left on a hold's countdown (the server's expiry less the margin). */
export const holdLeft = (hold, now = serverNow()) => Date.parse(hold.hold_expires_at) - HOLD_MARGIN_MS - now;

export class Hold {
  constructor() {
    this.current = null; // the pending appointment shown in the hold panel
    this.confirming = null; // id of the hold whose `book` is in flight
    this.announced = new Set(); // hold ids whose expiry was already announced
  }

  is(id) {
    return this.current?.id === id;
  }

  isOn(slotId) {
    return this.current?.slot_id === slotId;
  }

  /** Show this pending appointment as the hold; returns the slot id of the one it replaces. */
  set(appointment) {
    const previousSlot = this.current?.slot_id;
    this.current = appointment;
    return previousSlot;
  }

  /** No hold any more; returns the slot id it was on. */
  clear() {
    const slotId = this.current?.slot_id;
    this.current = null;
    return slotId;
  }

  /**
   * Whether the countdown has run out. While a confirm is in flight the
   * server's answer says whether it was in time; announcing the expiry now
   * could contradict a "Booked" a moment later.
   */
  ranOut(hold, left) {
    return left <= 0 && this.confirming !== hold.id;
  }

  /** Note that a hold's expiry was told (by a notice or an error); true the first time only. */
  announce(id) {
    if (this.announced.has(id)) return false;
    this.announced.add(id);
    return true;
  }

  /**
   * The pending appointment of a fresh list to show as the hold: the one that
   * expires last, among those still running and not announced as expired
   * (the countdown ends early, so the server may still list it as pending).
   */
  resumable(list, now = serverNow()) {
    return list
      .filter((a) => a.status === "pending" && holdLeft(a, now) > 0 && !this.announced.has(a.id))
      .sort((a, b) => Date.parse(b.hold_expires_at) - Date.parse(a.hold_expires_at))[0];
  }
}
