// The doctor page's timeline of the chosen day: one row per slot with its
// appointment, badges and actions (block, unblock, arrived, no-show,
// fulfilled, cancel, reschedule to another free time of the same doctor), a
// blocked slot's reason, updated live from the dashboard room. The day is state
// (dashboard.js: DayBook); this watches it, draws its rows and sends the
// commands.

import { serverNow } from "./clock.js";
import { DayBook } from "./dashboard.js";
import { addDays, dayLong, dayShort, timeHM } from "./format.js";
import { errorCode, statusWords } from "./messages.js";
import { el, keyedRows } from "./ui.js";

const DEFAULT_CANCEL_REASON = "Cancelled by the clinic";
// The server's attendance window (SLOTCAST_ARRIVE_EARLY_MINUTES, SLOTCAST_UNMARK_WINDOW_S,
// handed over in a meta tag): the page offers only what the server would accept; the
// server still decides (`too_early`). Its defaults when the tag is missing.
const [ARRIVE_EARLY_MS, UNDO_MS] = (() => {
  const [minutes, seconds] = (document.querySelector('meta[name="slotcast-attendance"]')?.content ?? "")
    .split(" ")
    .map(Number);
  return [(Number.isFinite(minutes) && minutes >= 0 ? minutes : 60) * 60_000, (seconds > 0 ? seconds : 600) * 1000];
})();
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
  let confirmingNoshow = null; // appointment id whose no-show confirmation is open
  // The open reschedule picker: {appointmentId, date, slots (free ones, null while loading), chosen, note}.
  let picker = null;
  const busyRows = new Set(); // slot ids with a command in flight
  const marked = new Map(); // appointment id -> when this page marked it (undo offered)
  const hm = (instant) => timeHM(instant, page.days.zone);

  /** The chosen day, shown afresh (no cancel form open). */
  function open() {
    cancelling = null;
    confirmingNoshow = null;
    picker = null;
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
    // Kept by slot, so a keyboard user's focus and an open cancel form survive updates.
    const items = keyedRows(list, "slot-row", rows, rowSignature, renderRow);
    list.replaceChildren(...items);
  }

  function rowSignature({ slot, appointment, conflict, reason }) {
    return [
      slot.status,
      reason,
      picker && picker.appointmentId === appointment?.id ? JSON.stringify(picker) : "",
      appointment?.id,
      appointment?.status,
      appointment?.patient_name,
      appointment?.visit_reason,
      appointment?.patient_contact,
      conflict,
      cancelling === appointment?.id,
      confirmingNoshow === appointment?.id,
      busyRows.has(slot.id),
      appointment ? `${timeState(appointment)}:${undoable(appointment)}` : "",
    ].join("|");
  }

  function renderRow({ slot, appointment, conflict, reason }) {
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
      // Why the patient comes, when given (docs/protocol.md, "Visit details").
      if (appointment.visit_reason) body.append(el("span", { class: "row-note", "data-testid": "visit-reason" }, appointment.visit_reason));
      // How to reach them, when the front desk took it down (a phoned-in booking).
      if (appointment.patient_contact) body.append(el("span", { class: "row-note", "data-testid": "contact" }, appointment.patient_contact));
    } else {
      body.append(el("span", { class: `badge badge-${slot.status}` }, SLOT_WORDS[slot.status] ?? slot.status));
      if (reason) body.append(el("span", { class: "row-note", "data-testid": "block-reason" }, reason));
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
    // Attendance only once its time has come: arrived from an hour before the start,
    // no-show and fulfilled from the start. Before that the button says from when.
    const state = appointment ? timeState(appointment) : "";
    const timed = (text, label, opensAt, run, kind) => {
      if (state === "early" || (state === "arrivable" && opensAt === "start")) {
        const from = opensAt === "start" ? hm(appointment.start) : hm(Date.parse(appointment.start) - ARRIVE_EARLY_MS);
        return el(
          "button",
          { type: "button", class: `btn btn-small ${kind}`, "aria-label": `${label} (from ${from})`, disabled: true, title: `From ${from}` },
          text,
        );
      }
      return action(text, label, run, kind);
    };
    if (appointment?.status === "booked") {
      actions.append(
        timed("Arrived", `Mark ${time} arrived`, "early", () => mark(appointment, "arrived"), "btn-primary"),
        timed("No-show", `Mark ${time} no-show`, "start", () => openNoshow(appointment), "btn-quiet"),
        action("Reschedule", `Reschedule ${time}`, () => openPicker(appointment)),
        action("Cancel", `Cancel ${time}`, () => openCancel(appointment)),
      );
    }
    if (appointment?.status === "arrived") {
      actions.append(timed("Fulfilled", `Mark ${time} fulfilled`, "start", () => mark(appointment, "fulfilled"), "btn-primary"));
    }
    if (appointment && undoable(appointment)) {
      actions.append(action("Undo", `Undo ${statusWords(appointment.status).toLowerCase()} at ${time}`, () => unmark(appointment)));
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
    if (appointment && confirmingNoshow === appointment.id) row.append(noshowConfirm(appointment, time));
    if (appointment && picker?.appointmentId === appointment.id) row.append(reschedulePicker(appointment, time));
    return row;
  }

  /** "early" (no mark yet), "arrivable" (arrived only, before the start) or "open". */
  function timeState(appointment) {
    const now = serverNow();
    const start = Date.parse(appointment.start);
    if (now < start - ARRIVE_EARLY_MS) return "early";
    return now < start ? "arrivable" : "open";
  }

  /** Marked from this page lately, and still as marked: the server would take it back. */
  function undoable(appointment) {
    const at = marked.get(appointment.id);
    return Boolean(at && at.status === appointment.status && serverNow() - at.when < UNDO_MS);
  }

  function noshowConfirm(appointment, time) {
    const yes = el(
      "button",
      { type: "button", class: "btn btn-small btn-danger", onclick: () => confirmNoshow(appointment) },
      "Confirm no-show",
    );
    queueMicrotask(() => yes.isConnected && yes.focus());
    return el(
      "div",
      { class: "cancel-form", role: "group", "aria-label": `Confirm no-show at ${time}` },
      el("p", {}, `Mark ${appointment.patient_id} as a no-show at ${time}? The patient sees it at once.`),
      el(
        "div",
        { class: "actions" },
        yes,
        el("button", { type: "button", class: "btn btn-small btn-quiet", onclick: closeNoshow }, "Keep as booked"),
      ),
    );
  }

  function openNoshow(appointment) {
    confirmingNoshow = appointment.id;
    render();
  }

  function closeNoshow() {
    confirmingNoshow = null;
    render();
  }

  async function confirmNoshow(appointment) {
    confirmingNoshow = null;
    await mark(appointment, "noshow");
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

  // ---- reschedule ----------------------------------------------------------------------------
  // The picker offers the free times of one day (the doctor's seven shown days), read afresh
  // from the public slots when it opens or the day changes; the server still decides, and a
  // time taken meanwhile is explained and the list read again.

  function openPicker(appointment) {
    cancelling = null;
    confirmingNoshow = null;
    picker = { appointmentId: appointment.id, date: page.days.selected, slots: null, chosen: null, note: null };
    render();
    loadPicker();
  }

  function closePicker() {
    picker = null;
    render();
  }

  async function loadPicker(note = null) {
    const mine = picker;
    if (!mine) return;
    mine.slots = null;
    mine.note = note;
    render();
    try {
      const query = `start=${mine.date}&end=${addDays(mine.date, 1)}`;
      const response = await fetch(`/api/doctors/${page.doctorId}/slots?${query}`);
      if (!response.ok) throw Object.assign(new Error("slots"), { code: (await response.json()).error?.code ?? "internal" });
      const snapshot = await response.json();
      const now = serverNow();
      const free = snapshot.slots.filter((s) => s.status === "free" && Date.parse(s.start) > now);
      if (picker !== mine) return;
      mine.slots = free.map((s) => ({ id: s.id, start: s.start }));
      mine.chosen = mine.slots[0]?.id ?? null;
      render();
    } catch (error) {
      if (picker !== mine) return;
      mine.slots = [];
      render();
      page.fail(error);
    }
  }

  function reschedulePicker(appointment, time) {
    const id = appointment.id;
    const day = el(
      "select",
      {
        id: `rs-day-${id}`,
        onchange: (event) => {
          picker.date = event.target.value;
          loadPicker();
        },
      },
      ...page.days.dates.map((date, i) => el("option", { value: date, selected: date === picker.date }, i === 0 ? `Today, ${dayShort(date)}` : dayShort(date))),
    );
    const slots = picker.slots;
    const choice = el(
      "select",
      {
        id: `rs-slot-${id}`,
        disabled: !slots?.length,
        "data-testid": "reschedule-slot",
        onchange: (event) => (picker.chosen = Number(event.target.value)),
      },
      ...(slots === null
        ? [el("option", {}, "Loading…")]
        : slots.length === 0
          ? [el("option", {}, "No free time that day")]
          : slots.map((s) => el("option", { value: s.id, selected: s.id === picker.chosen }, hm(s.start)))),
    );
    // The keyboard stays on the picker's control it was on when the picker is redrawn (times
    // loaded, a race lost), and starts on the day when it opens; after the row's own focus
    // keeping (a microtask), so a timeout. Never taken from somewhere else on the page.
    const was = document.activeElement?.id;
    setTimeout(() => {
      if (!day.isConnected) return;
      const active = document.activeElement;
      const row = day.closest("[data-testid=slot-row]");
      if (active && active !== document.body && !row.contains(active)) return;
      if (active?.closest?.(".reschedule-form")) return;
      const again = was && was.startsWith("rs-") ? document.getElementById(was) : null;
      (again && !again.disabled ? again : day).focus();
    }, 0);
    return el(
      "form",
      {
        class: "cancel-form reschedule-form",
        "data-testid": "reschedule-form",
        "aria-label": `Reschedule ${appointment.patient_name ?? appointment.patient_id} at ${time}`,
        onsubmit: (event) => {
          event.preventDefault();
          if (picker?.chosen) reschedule(appointment, picker.chosen);
        },
      },
      picker.note ? el("p", { class: "sched-warning", role: "alert" }, picker.note) : null,
      el("label", { for: day.id }, "Day"),
      day,
      el("label", { for: choice.id }, "New time"),
      choice,
      el(
        "div",
        { class: "actions" },
        el("button", { type: "submit", class: "btn btn-small btn-primary", disabled: !slots?.length }, "Move appointment"),
        el("button", { type: "button", class: "btn btn-small btn-quiet", onclick: closePicker }, "Keep time"),
      ),
    );
  }

  async function reschedule(appointment, slotId) {
    const intention = `reschedule:${appointment.id}:${slotId}`;
    busyRows.add(appointment.slot_id);
    render();
    try {
      await page.conn.request(
        "reschedule",
        { appointment_id: appointment.id, slot_id: slotId, idempotency_key: intentions.key(intention) },
        { retry: true },
      );
      intentions.settle(intention);
      picker = null;
    } catch (error) {
      intentions.settle(intention, error);
      const code = errorCode(error);
      if (["slot_taken", "slot_unavailable", "too_late"].includes(code) && picker) {
        // A lost race: say so beside the picker, and offer what is still free.
        loadPicker("Someone else took that time a moment ago. The list now shows what is still free.");
      } else {
        page.fail(error);
      }
    } finally {
      busyRows.delete(appointment.slot_id);
      render();
    }
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

  async function mark(appointment, status) {
    const done = await run(appointment.slot_id, `mark:${appointment.id}:${status}`, "mark", {
      appointment_id: appointment.id,
      status,
    });
    if (done) {
      marked.set(appointment.id, { status, when: serverNow() });
      setTimeout(render, UNDO_MS + 1000); // the Undo button goes when the server would refuse it
    }
  }

  async function unmark(appointment) {
    const done = await run(appointment.slot_id, `unmark:${appointment.id}:${appointment.status}`, "unmark", {
      appointment_id: appointment.id,
    });
    if (done) marked.delete(appointment.id);
  }

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
