// The doctor page's timeline of the chosen day: one row per slot with its
// appointment, badges and actions (block, unblock, arrived, no-show,
// fulfilled, cancel), updated live from the dashboard room. The day is state
// (dashboard.js: DayBook); this watches it, draws its rows and sends the
// commands.

import { DayBook } from "./dashboard.js";
import { dayLong, timeHM } from "./format.js";
import { statusWords } from "./messages.js";
import { el, reducedMotion } from "./ui.js";

const DEFAULT_CANCEL_REASON = "Cancelled by the clinic";
const SLOT_WORDS = { free: "Free", "busy-tentative": "Held", busy: "Booked", "busy-unavailable": "Blocked" };

const $ = (selector) => document.querySelector(selector);

/**
 * `page`: {conn, intentions, doctorId, days, day, fail}; `page.day` is the
 * DayBook shown. `showZone(zone)` adopts the zone a dashboard reports;
 * `rememberCounts(appointments)` feeds the tabs' counts.
 */
export function dayTimeline(page, { showZone, rememberCounts }) {
  const { intentions } = page;
  // What the rows show of this page's own actions (not the server's state):
  let cancelling = null; // appointment id whose cancel form is open
  const busyRows = new Set(); // slot ids with a command in flight
  const hm = (instant) => timeHM(instant, page.days.zone);

  /** The chosen day, shown afresh (no cancel form open). */
  function open() {
    cancelling = null;
    watch();
  }

  async function watch() {
    const day = new DayBook(page.doctorId, page.days.selected);
    page.day = day;
    // A re-read of the same day (reconnect, gap) keeps showing the old rows meanwhile.
    if ($("[data-testid=timeline]").dataset.date !== day.date) render();
    try {
      const { body } = await page.conn.request("watch_dashboard", { doctor_id: page.doctorId, date: day.date });
      if (day !== page.day) return; // another day was chosen meanwhile
      day.applyDashboard(body);
      if (body.timezone !== page.days.zone) showZone(body.timezone);
      setWatchers(body.watchers);
      rememberCounts(body.appointments);
      render();
    } catch (error) {
      if (day === page.day && !page.conn.recover(error)) page.fail(error);
    }
  }

  /** A dashboard_delta of this doctor, for the day shown. */
  function onDelta(delta) {
    const day = page.day;
    if (!day) return;
    const outcome = day.applyDelta(delta);
    if (outcome === "gap" || delta.kinds.includes("slots.conflict_resolved")) {
      // A missed version, or conflicts we cannot resolve from the delta alone: re-read the day.
      watch();
    } else if (outcome === "applied") {
      render();
    }
  }

  function setWatchers(count) {
    const node = $("[data-testid=watchers]");
    node.textContent = String(count);
    node.setAttribute("aria-label", `${count} ${count === 1 ? "patient" : "patients"} viewing your calendar`);
  }

  function render() {
    const list = $("[data-testid=timeline]");
    const day = page.day;
    list.dataset.date = day.date;
    if (day.version === null) {
      delete list.dataset.version;
      list.replaceChildren(el("li", { class: "empty" }, "Loading…"));
      return;
    }
    list.dataset.version = day.version;
    const rows = day.rows();
    if (rows.length === 0) {
      list.replaceChildren(el("li", { class: "empty" }, `No slots on ${dayLong(day.date)}.`));
      return;
    }
    // Rows are kept by slot id and rebuilt only when what they show changed, so
    // a keyboard user's focus and an open cancel form survive unrelated updates.
    const focusedRow = document.activeElement?.closest?.("[data-testid=slot-row]");
    const items = rows.map((row) => {
      const signature = rowSignature(row);
      let item = list.querySelector(`[data-testid=slot-row][data-slot-id="${row.slot.id}"]`);
      if (!item || item.dataset.signature !== signature) {
        const fresh = renderRow(row);
        fresh.dataset.signature = signature;
        if (item && !reducedMotion()) fresh.classList.add("fresh");
        // Keep the keyboard where it was: the row's first usable button, else the row itself.
        if (item && item === focusedRow) queueMicrotask(() => (fresh.querySelector("button:enabled") ?? fresh).focus());
        item = fresh;
      }
      return item;
    });
    list.replaceChildren(...items);
  }

  function rowSignature({ slot, appointment, conflict }) {
    return [
      slot.status,
      appointment?.id,
      appointment?.status,
      appointment?.patient_name,
      conflict,
      cancelling === appointment?.id,
      busyRows.has(slot.id),
    ].join("|");
  }

  function renderRow({ slot, appointment, conflict }) {
    const time = hm(slot.start);
    const body = el("div", { class: "row-body" });
    if (appointment) {
      body.append(
        // The display name when the patient's token carried one; the subject on hover.
        el("span", { class: "row-patient", title: appointment.patient_id }, appointment.patient_name ?? appointment.patient_id),
        el(
          "span",
          { class: `badge badge-${appointment.status}`, dataset: { appointmentId: appointment.id, status: appointment.status } },
          statusWords(appointment.status),
        ),
      );
      if (appointment.status === "pending" && appointment.hold_expires_at) {
        body.append(el("span", { class: "row-note" }, `until ${hm(appointment.hold_expires_at)}`));
      }
    } else {
      body.append(el("span", { class: `badge badge-${slot.status}` }, SLOT_WORDS[slot.status] ?? slot.status));
    }
    if (conflict) body.append(el("span", { class: "badge badge-conflict" }, "Conflict: outside the schedule"));

    const busy = busyRows.has(slot.id);
    const action = (text, label, run, kind = "btn-quiet") =>
      el("button", { type: "button", class: `btn btn-small ${kind}`, "aria-label": label, disabled: busy, onclick: run }, text);
    const actions = el("div", { class: "row-actions" });
    if (!appointment && slot.status === "free") actions.append(action("Block", `Block ${time}`, () => slotCommand("block", slot)));
    if (!appointment && slot.status === "busy-unavailable") {
      actions.append(action("Unblock", `Unblock ${time}`, () => slotCommand("unblock", slot)));
    }
    if (appointment?.status === "booked") {
      actions.append(
        action("Arrived", `Mark ${time} arrived`, () => mark(appointment, "arrived"), "btn-primary"),
        action("No-show", `Mark ${time} no-show`, () => mark(appointment, "noshow")),
        action("Cancel", `Cancel ${time}`, () => openCancel(appointment)),
      );
    }
    if (appointment?.status === "arrived") {
      actions.append(action("Fulfilled", `Mark ${time} fulfilled`, () => mark(appointment, "fulfilled"), "btn-primary"));
    }

    const row = el(
      "li",
      {
        class: "row",
        "data-testid": "slot-row",
        tabindex: -1,
        dataset: conflict ? { slotId: slot.id, status: slot.status, conflict: "true" } : { slotId: slot.id, status: slot.status },
      },
      el("span", { class: "row-time" }, time),
      body,
      actions,
    );
    if (appointment && cancelling === appointment.id) row.append(cancelForm(appointment, time));
    return row;
  }

  function cancelForm(appointment, time) {
    const reason = el("input", { id: `reason-${appointment.id}`, type: "text", maxlength: 500, required: true });
    reason.value = DEFAULT_CANCEL_REASON;
    queueMicrotask(() => reason.isConnected && reason.focus());
    return el(
      "form",
      {
        class: "cancel-form",
        onsubmit: (event) => {
          event.preventDefault();
          cancel(appointment, reason.value.trim());
        },
      },
      el("label", { for: reason.id }, `Reason for cancelling ${time}`),
      reason,
      el(
        "div",
        { class: "actions" },
        el("button", { type: "submit", class: "btn btn-small btn-danger" }, "Confirm cancel"),
        el("button", { type: "button", class: "btn btn-small btn-quiet", onclick: closeCancel }, "Keep appointment"),
      ),
    );
  }

  function openCancel(appointment) {
    cancelling = appointment.id;
    render();
  }

  function closeCancel() {
    cancelling = null;
    render();
  }

  // ---- commands ----------------------------------------------------------------------------
  // Replies are not applied to the timeline: the dashboard_delta of the same
  // version follows and is the one source of truth, in order.

  async function run(slotId, intention, type, body) {
    busyRows.add(slotId);
    render();
    try {
      await page.conn.request(type, { ...body, idempotency_key: intentions.key(intention) }, { retry: true });
      intentions.settle(intention);
      return true;
    } catch (error) {
      intentions.settle(intention, error);
      page.fail(error);
      return false;
    } finally {
      busyRows.delete(slotId);
      render();
    }
  }

  const slotCommand = (type, slot) => run(slot.id, `${type}:${slot.id}`, type, { slot_id: slot.id });

  const mark = (appointment, status) =>
    run(appointment.slot_id, `mark:${appointment.id}:${status}`, "mark", { appointment_id: appointment.id, status });

  async function cancel(appointment, reason) {
    if (!reason) return;
    const done = await run(appointment.slot_id, `cancel:${appointment.id}:${reason}`, "cancel", {
      appointment_id: appointment.id,
      reason,
    });
    if (done) closeCancel();
  }

  return { open, watch, onDelta, setWatchers };
}
