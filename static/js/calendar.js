// One doctor's availability for one watched range, as pure state: no DOM, no
// socket. It follows the version rules of docs/protocol.md ("Watching a
// calendar"): a snapshot sets the slots and the version; a delta applies only
// when it continues that version (a merged delta carries `since`, the version
// it applies on top of); anything older is dropped; anything newer is a gap,
// which the page repairs by watching again with `since`.

import { serverNow } from "./clock.js";
import { dateKey } from "./format.js";

const MINUTE_MS = 60_000;
const DAY_MS = 86_400_000;

export class Calendar {
  /** `start` and `end` are the doctor's local dates [start, end), as sent in `watch`. */
  constructor(doctorId, start, end) {
    this.doctorId = doctorId;
    this.start = start;
    this.end = end;
    this.timezone = null;
    this.version = null; // null until the first snapshot
    this.slots = new Map(); // slot id -> slot {id, start, end, status, hold_expires_at}
    // Deltas are dropped while a watch is in flight: its reply (snapshot or
    // resumed + replayed deltas) covers them.
    this.awaitingReply = true;
    this.bookableFrom = null; // ms since epoch, at `readAt`
    this.bookableUntil = null;
    this.readAt = 0;
  }

  /** The `watch` body that (re)joins this calendar, resuming when it can. */
  watchBody() {
    return { doctor_id: this.doctorId, start: this.start, end: this.end, since: this.version };
  }

  /** Mark a watch as sent (the first one, a resume, or a gap repair). */
  watching() {
    this.awaitingReply = true;
  }

  applySnapshot(snapshot) {
    this.timezone = snapshot.timezone;
    this.version = snapshot.version;
    this.slots = new Map(snapshot.slots.map((slot) => [slot.id, slot]));
    this.bookableFrom = snapshot.bookable_from ? Date.parse(snapshot.bookable_from) : null;
    this.bookableUntil = snapshot.bookable_until ? Date.parse(snapshot.bookable_until) : null;
    this.readAt = serverNow();
    this.awaitingReply = false;
  }

  /** The reply to a watch with `since`: keep everything; the missed deltas follow. */
  applyResumed() {
    this.awaitingReply = false;
  }

  /**
   * Apply a delta. Returns {outcome, changed, removed}: outcome is "applied",
   * "stale" (already contained), "ignored" (a watch reply is pending) or "gap"
   * (a version was missed: the caller must watch again with `since`).
   */
  applyDelta(delta) {
    const none = { changed: [], removed: [] };
    if (this.awaitingReply || this.version === null) return { outcome: "ignored", ...none };
    if (delta.version <= this.version) return { outcome: "stale", ...none };
    const base = delta.since ?? delta.version - 1;
    if (base > this.version) {
      this.awaitingReply = true; // drop deltas until the repairing watch answers
      return { outcome: "gap", ...none };
    }
    const changed = [];
    for (const slot of delta.slots) {
      // A delta covers the doctor's whole calendar: keep only our range.
      if (this.slots.has(slot.id) || this.inRange(slot)) {
        this.slots.set(slot.id, slot);
        changed.push(slot.id);
      }
    }
    const removed = delta.removed.filter((id) => this.slots.delete(id));
    this.version = delta.version; // also for an empty delta, so the next one is not a gap
    const rules = this.applyRules(delta.doctor);
    return { outcome: "applied", changed, removed, rules };
  }

  /**
   * A delta's doctor entry carries the rules that decide the bookable window
   * (every schedule save sends them): recompute the window from them as a
   * snapshot would, from now. True when it did, so every slot must be drawn
   * again. An entry without them (recorded before they rode along) leaves the
   * window alone.
   */
  applyRules(doctor) {
    const notice = doctor?.min_notice_minutes;
    const horizon = doctor?.horizon_days;
    if (typeof notice !== "number" || typeof horizon !== "number") return false;
    this.readAt = serverNow();
    this.bookableFrom = this.readAt + notice * MINUTE_MS;
    this.bookableUntil = this.readAt + horizon * DAY_MS;
    return true;
  }

  inRange(slot) {
    if (!this.timezone) return false;
    const day = dateKey(slot.start, this.timezone);
    return day >= this.start && day < this.end;
  }

  /**
   * Why a free slot cannot be taken now, or null when it can: "started",
   * "too_late" (inside the doctor's notice) or "outside_horizon". The bookable
   * window slides with the clock, so shift it by the time since the snapshot.
   */
  unbookableReason(slot, now = serverNow()) {
    const start = Date.parse(slot.start);
    if (start <= now) return "started";
    const elapsed = now - this.readAt;
    if (this.bookableFrom !== null && start < this.bookableFrom + elapsed) return "too_late";
    if (this.bookableUntil !== null && start >= this.bookableUntil + elapsed) return "outside_horizon";
    return null;
  }
}
