// The patient page's "choose a new time" mode: Reschedule on a booked
// appointment shows its doctor's week with a bar above it that says what is
// being moved and how to get out. A slot picked in the grid then asks once
// ("Move appointment"), and `reschedule` moves the booking in one change on the
// server: the old slot is freed as the new one is taken, or nothing changes. A
// lost race (the time was taken meanwhile) is told in words, the old booking
// stands, and the patient simply picks another time.

import { ServerError } from "./connection.js";
import { patientWhen } from "./format.js";

const $ = (selector) => document.querySelector(selector);

// Codes that mean "that new time cannot be had"; the old booking stands.
const LOST = new Set(["slot_taken", "slot_unavailable", "too_late", "outside_horizon", "cooldown", "appointment_limit"]);

/**
 * `page`: {conn, intentions, zone, doctors, fail, doctorZone}. `showDoctor(id)` brings
 * that doctor's week; `remember(appointment)` files a reply's appointment;
 * `moved(appointment)` shows the result; `resync()` fetches my appointments afresh.
 */
export function rescheduler(page, { showDoctor, remember, moved, resync }) {
  let moving = null; // the booked appointment being moved
  let chosen = null; // the slot picked for it: {id, start}

  const when = (start, doctorId) => patientWhen(start, page.zone, page.doctorZone(doctorId));

  /** Reschedule pressed on a booked appointment. */
  function start(appointment) {
    moving = appointment;
    chosen = null;
    showDoctor(appointment.doctor_id);
    document.body.classList.add("rescheduling");
    $("#reschedule-bar").hidden = false;
    problem("");
    render();
    $("#reschedule-bar").scrollIntoView({ block: "nearest" });
    $("#reschedule-h").focus();
  }

  function render() {
    if (!moving) return;
    const what = `${page.doctors.name(moving.doctor_id)}, ${when(moving.start, moving.doctor_id)}`;
    $("#reschedule-what").textContent = chosen
      ? `Move your appointment with ${what} to ${when(chosen.start, moving.doctor_id)}?`
      : `Moving your appointment with ${what}. Pick a free time in the calendar below; your current time stays booked until the move is done.`;
    $("#reschedule-choice").hidden = !chosen;
  }

  function problem(text) {
    $("#reschedule-problem").textContent = text;
    $("#reschedule-problem").hidden = !text;
  }

  /** Whether a slot picked in the grid is for this mode (else it is a hold as usual). */
  function active() {
    return moving !== null;
  }

  /** A slot picked in the grid while choosing a new time. */
  function pick(slotId) {
    const slot = page.week.calendar?.slots.get(slotId);
    chosen = { id: slotId, start: slot?.start ?? moving.start };
    problem("");
    render();
    $("#reschedule-confirm").focus();
  }

  async function confirm() {
    if (!moving || !chosen) return;
    if (!page.conn.ready) {
      problem("You are offline, so nothing was moved. Press Move appointment again once you are back online.");
      return;
    }
    const { id: slotId, start: newStart } = chosen;
    const appointment = moving;
    const intention = `reschedule:${appointment.id}:${slotId}`;
    $("#reschedule-confirm").disabled = true;
    try {
      const { body } = await page.conn.request(
        "reschedule",
        { appointment_id: appointment.id, slot_id: slotId, idempotency_key: page.intentions.key(intention) },
        { retry: true },
      );
      page.intentions.settle(intention);
      remember(body.replaced);
      remember(body.appointment);
      stop({ focus: false });
      moved(body.appointment);
    } catch (error) {
      page.intentions.settle(intention, error);
      if (moving !== appointment) return; // the patient stopped meanwhile
      if (LOST.has(error.code)) {
        chosen = null;
        render();
        const reason =
          error.code === "slot_taken"
            ? `Someone else took ${when(newStart, appointment.doctor_id)} just before you.`
            : `${when(newStart, appointment.doctor_id)} cannot be booked any more.`;
        problem(`${reason} Your appointment on ${when(appointment.start, appointment.doctor_id)} is still booked. Please pick another time.`);
      } else if (["invalid_transition", "not_found", "forbidden"].includes(error.code)) {
        stop({ focus: false });
        resync();
        page.fail(error);
      } else {
        page.fail(error instanceof ServerError ? error : new ServerError("internal"));
      }
    } finally {
      $("#reschedule-confirm").disabled = false;
    }
  }

  /** Leave the mode; nothing is changed on the server. */
  function stop({ focus = true } = {}) {
    const bar = $("#reschedule-bar");
    const hadFocus = bar.contains(document.activeElement);
    const appointment = moving;
    moving = null;
    chosen = null;
    bar.hidden = true;
    document.body.classList.remove("rescheduling");
    if (focus && hadFocus && appointment) {
      const item = document.querySelector(`[data-testid=my-appointments] li[data-appointment-id="${appointment.id}"] button`);
      (item ?? $("#main")).focus();
    }
  }

  /** An appointment changed (an event or a reply): moving one that is no longer booked is over. */
  function update(appointment) {
    if (moving?.id === appointment.id && appointment.status !== "booked") {
      stop({ focus: false });
    }
  }

  $("#reschedule-confirm").addEventListener("click", confirm);
  $("#reschedule-other").addEventListener("click", () => {
    chosen = null;
    render();
    $("#reschedule-h").focus();
  });
  $("#reschedule-stop").addEventListener("click", () => stop());
  return { start, active, pick, stop, update, doctorId: () => moving?.doctor_id ?? null };
}
