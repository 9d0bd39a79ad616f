// The patient page's "My appointments": the list, each one's badge, the
// cancel form and Reschedule. The appointments are state (appointments.js);
// this watches them, draws them, and keeps the hold panel in step, since the
// hold is the patient's pending appointment (held from another tab, expired,
// booked). The count in the phone's "My appointments" link is kept here too.

import { DEFAULT_CANCEL_REASON } from "./appointments.js";
import { ServerError } from "./connection.js";
import { patientWhen } from "./format.js";
import { holdLeft } from "./hold.js";
import { el, reducedMotion, showNotice, showWarning } from "./ui.js";

const $ = (selector) => document.querySelector(selector);

/**
 * `page`: {conn, intentions, zone, doctors, hold, appointments, fail, doctorZone, bookAgain}.
 * `panel`: the hold panel's {show, clear, expired}; `loadAllDoctors()` names
 * doctors no search has shown; `reschedule(appointment)` starts choosing a new time.
 */
export function myAppointments(page, { panel, loadAllDoctors, reschedule }) {
  const { appointments: state, hold, intentions, zone } = page;
  const when = (appointment) => patientWhen(appointment.start, zone, page.doctorZone(appointment.doctor_id));

  async function watch() {
    try {
      const { body } = await page.conn.request("watch_appointments", {});
      applyList(body.appointments);
    } catch (error) {
      if (!page.conn.recover(error)) page.fail(error);
    }
  }

  /** A fresh list (first load, reconnect, resync): it replaces what we knew. */
  function applyList(list) {
    state.replace(list);
    // The hold survives reloads and reconnects: it is the pending appointment.
    const held = hold.current;
    if (held && state.get(held.id)?.status !== "pending") {
      if (holdLeft(held) <= 0) panel.expired(held);
      else panel.clear();
    }
    if (!hold.current) {
      const pending = hold.resumable(list);
      if (pending) panel.show(pending);
    }
    render();
    if (!page.doctors.loaded && list.some((a) => !page.doctors.has(a.doctor_id))) loadAllDoctors().catch(() => {});
  }

  function onEvent(event) {
    const applied = state.applyEvent(event);
    if (!applied) return; // a repeat, or older than what we have
    const { appointment } = event;
    if (hold.is(appointment.id) && appointment.status !== "pending") {
      if (appointment.cancel_reason === "hold expired") panel.expired(hold.current);
      else panel.clear();
    } else if (!hold.current && appointment.status === "pending" && holdLeft(appointment) > 0) {
      panel.show(appointment); // held from another tab or device
    }
    if (state.clinicCancelled(applied.before, appointment)) {
      showWarning(
        "cancelled",
        `${page.doctors.name(appointment.doctor_id)}'s clinic cancelled your appointment on ${when(appointment)}.`,
        { label: "Book again", run: () => page.bookAgain(appointment) },
      );
    }
    render();
  }

  /** A reply's appointment (held, booked, cancelled). */
  function remember(appointment) {
    state.applyReply(appointment);
    render();
  }

  function render() {
    const list = $("[data-testid=my-appointments]");
    const shown = state.shown();
    $("#no-appointments").hidden = shown.length > 0;
    const items = shown.map((appointment) => {
      const item =
        list.querySelector(`li[data-appointment-id="${appointment.id}"]`) ??
        el("li", { class: "appointment", dataset: { appointmentId: appointment.id } });
      renderItem(item, appointment);
      return item;
    });
    list.replaceChildren(...items); // moves existing items, so an open cancel form keeps its text
    const upcoming = shown.filter((a) => ["pending", "booked", "arrived"].includes(a.status)).length;
    $("[data-testid=jump-appointments]").textContent = upcoming ? `My appointments (${upcoming})` : "My appointments";
  }

  function renderItem(item, appointment) {
    const statusChanged = item.dataset.status !== appointment.status;
    item.dataset.status = appointment.status;
    if (!statusChanged && item.firstChild) {
      item.querySelector(".who").textContent = page.doctors.name(appointment.doctor_id);
      return;
    }
    const reason = state.clinicReason(appointment);
    item.replaceChildren(
      el(
        "div",
        { class: "appointment-head" },
        el("p", { class: "who" }, page.doctors.name(appointment.doctor_id)),
        el("span", { class: `badge badge-${appointment.status}` }, state.badgeText(appointment)),
      ),
      el("p", { class: "when" }, when(appointment)),
    );
    if (reason) item.append(el("p", { class: "reason" }, `Reason: ${reason}`));
    if (appointment.status === "booked") item.append(cancelControls(appointment));
    if (statusChanged && item.isConnected && !reducedMotion()) item.classList.add("fresh");
  }

  function cancelControls(appointment) {
    const wrap = el("div", { class: "cancel" });
    const open = () => {
      const reason = el("input", { id: `reason-${appointment.id}`, type: "text", maxlength: 500, required: true });
      reason.value = DEFAULT_CANCEL_REASON;
      const form = el(
        "form",
        { class: "cancel-form", onsubmit: (event) => (event.preventDefault(), cancel(appointment, reason.value.trim())) },
        el("label", { for: reason.id }, "Reason"),
        reason,
        el("div", { class: "actions" },
          el("button", { type: "submit", class: "btn btn-danger" }, "Confirm cancel"),
          el("button", { type: "button", class: "btn btn-quiet", onclick: close }, "Keep appointment"),
        ),
      );
      wrap.replaceChildren(form);
      reason.focus();
      reason.select();
    };
    const close = () => {
      wrap.replaceChildren(move, button);
      button.focus();
    };
    const button = el(
      "button",
      { type: "button", class: "btn btn-quiet", "aria-label": `Cancel ${when(appointment)}`, onclick: open },
      "Cancel",
    );
    const move = el(
      "button",
      { type: "button", class: "btn btn-quiet", "aria-label": `Reschedule ${when(appointment)}`, onclick: () => reschedule(appointment) },
      "Reschedule",
    );
    wrap.append(move, button);
    return wrap;
  }

  async function cancel(appointment, reason) {
    if (!reason) return;
    if (!page.conn.ready) {
      page.fail(new ServerError("offline")); // not kept to be sent later
      return;
    }
    const intention = `cancel:${appointment.id}:${reason}`;
    try {
      const { body } = await page.conn.request(
        "cancel",
        { appointment_id: appointment.id, reason, idempotency_key: intentions.key(intention) },
        { retry: true },
      );
      intentions.settle(intention);
      state.cancelledHere(appointment.id);
      remember(body.appointment);
      showNotice("cancelled", `Cancelled your appointment on ${when(appointment)}.`);
    } catch (error) {
      intentions.settle(intention, error);
      page.fail(error);
      if (error.code === "invalid_transition") watch();
    }
  }

  return { watch, onEvent, remember, render };
}
