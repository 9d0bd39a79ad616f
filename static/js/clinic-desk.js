// The front desk's three actions for a patient who phones in: book a free
// slot (the patient's sign-in id, name, contact and visit reason), cancel and
// reschedule, all on the patient's behalf (docs/protocol.md, "On a patient's
// behalf"). Each is a modal <dialog>: focus moves into it, Escape or "Keep"
// leaves it, and focus goes back to the button that opened it. A refusal is
// said inside the dialog (the page behind it is inert), in the words of
// messages.js; the day itself changes only when the server's change arrives
// in the dashboard room, like any other booking.

import { addDays, dateKey, dayLong, timeHM } from "./format.js";
import { errorCode, errorText } from "./messages.js";
import { el, showNotice } from "./ui.js";

let fieldIds = 0;

/** A labelled input (or textarea, select) with an optional hint, as one block. */
function field(label, control, hint = null) {
  const id = `desk-field-${++fieldIds}`;
  control.id = id;
  const block = el("div", { class: "desk-field" }, el("label", { for: id }, label), control);
  if (hint) {
    const hintId = `${id}-hint`;
    control.setAttribute("aria-describedby", hintId);
    block.append(el("p", { class: "hint desk-hint", id: hintId }, hint));
  }
  return block;
}

/**
 * Open a modal form. `run(form)` sends the command; resolving closes the
 * dialog, throwing (a ServerError) shows why inside it and keeps it open.
 */
function openDialog({ title, intro, fields, submit, dismiss = "Close", danger = false, run, opener }) {
  const error = el("p", { class: "desk-error", role: "alert" });
  // No submit button when there is nothing to choose (a move with no free time left).
  const send = submit && el("button", { type: "submit", class: `btn ${danger ? "btn-danger" : "btn-primary"}` }, submit);
  const form = el(
    "form",
    { class: "desk-form" },
    ...fields,
    error,
    el("div", { class: "switch-actions" }, el("button", { type: "button", class: "btn", onclick: () => dialog.close() }, dismiss), send),
  );
  const dialog = el(
    "dialog",
    { class: "switch-dialog card desk-dialog", "data-testid": "desk-dialog", "aria-labelledby": "desk-h", "aria-describedby": "desk-intro" },
    el("h2", { id: "desk-h" }, title),
    el("p", { id: "desk-intro", class: "muted" }, intro),
    form,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!send) return;
    send.disabled = true;
    error.textContent = "";
    try {
      await run(form);
      dialog.close();
    } catch (failure) {
      error.textContent = errorText(errorCode(failure));
      send.disabled = false;
    }
  });
  // Back to the button that opened it; when the change has redrawn its row meanwhile,
  // to that row (the page then keeps focus in it as it redraws).
  const row = opener?.closest("[data-testid=clinic-row]");
  const card = row?.closest("[data-testid=clinic-doctor]");
  dialog.addEventListener("close", () => {
    dialog.remove();
    if (opener?.isConnected) opener.focus();
    else if (row && card) {
      document
        .querySelector(`[data-testid=clinic-doctor][data-doctor-id="${card.dataset.doctorId}"] [data-testid=clinic-row][data-slot-id="${row.dataset.slotId}"]`)
        ?.focus();
    }
  });
  document.body.append(dialog);
  dialog.showModal();
  form.querySelector("input, select, textarea, button")?.focus();
}

/**
 * The doctor's free times on one of their local dates that can still be booked
 * (notice and horizon), from the public availability: any day, not only the one
 * shown. Resolves to {zone, slots}.
 */
async function freeTimes(doctorId, date) {
  const query = new URLSearchParams({ start: date, end: addDays(date, 1) });
  const response = await fetch(`/api/doctors/${doctorId}/slots?${query}`, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`availability: ${response.status}`);
  const snapshot = await response.json();
  const from = snapshot.bookable_from ? Date.parse(snapshot.bookable_from) : -Infinity;
  const until = snapshot.bookable_until ? Date.parse(snapshot.bookable_until) : Infinity;
  const open = (slot) => slot.status === "free" && Date.parse(slot.start) >= from && Date.parse(slot.start) < until;
  return { zone: snapshot.timezone, slots: snapshot.slots.filter(open) };
}

/** `page`: {conn, intentions}. Each action takes what the row knows and the button pressed. */
export function deskDialogs(page) {
  /** Send a command under its intention's idempotency key (a retry reuses it). */
  async function command(intention, type, body) {
    const key = page.intentions.key(intention);
    try {
      const reply = await page.conn.request(type, { ...body, idempotency_key: key });
      page.intentions.settle(intention);
      return reply;
    } catch (error) {
      page.intentions.settle(intention, error);
      throw error;
    }
  }

  const when = (day, time) => `${dayLong(day.date)} at ${time}`;

  function book({ doctor, day, slot, time }, opener) {
    const text = (name, props = {}) => el("input", { type: "text", name, autocomplete: "off", ...props });
    openDialog({
      title: `Book ${time} with ${doctor.name}`,
      intro: `For a patient who phoned in: ${when(day, time)}.`,
      fields: [
        field("Patient's sign-in ID", text("patient_id", { required: true, maxlength: 128 }), "What they sign in with: the booking appears in their appointments."),
        field("Patient's name", text("patient_name", { required: true, maxlength: 200, autocomplete: "off" })),
        field("Phone or e-mail", text("patient_contact", { maxlength: 120 }), "How the clinic reaches them (optional)."),
        field("Reason for the visit", el("textarea", { name: "visit_reason", rows: 2, maxlength: 300 }), "Optional, up to 300 characters."),
      ],
      submit: "Book",
      opener,
      run: async (form) => {
        const data = new FormData(form);
        const value = (name) => String(data.get(name) ?? "").trim() || null;
        const body = {
          slot_id: slot.id,
          patient_id: value("patient_id"),
          patient_name: value("patient_name"),
          patient_contact: value("patient_contact"),
          visit_reason: value("visit_reason"),
        };
        await command(`desk-book:${slot.id}:${body.patient_id}`, "book", body);
        showNotice("booked", `Booked ${when(day, time)} with ${doctor.name} for ${body.patient_name}.`);
      },
    });
  }

  function cancel({ doctor, day, appointment, time, who }, opener) {
    const reason = el("input", { type: "text", name: "reason", required: true, maxlength: 500, value: "Cancelled by the front desk" });
    openDialog({
      title: `Cancel ${who}'s appointment?`,
      intro: `${when(day, time)} with ${doctor.name}. The time becomes free for others at once.`,
      fields: [field("Reason", reason, "The patient sees it in their appointments.")],
      submit: "Cancel appointment",
      dismiss: "Keep appointment",
      danger: true,
      opener,
      run: async (form) => {
        const text = String(new FormData(form).get("reason") ?? "").trim();
        await command(`desk-cancel:${appointment.id}`, "cancel", {
          appointment_id: appointment.id,
          reason: text || "Cancelled by the front desk",
          patient_id: appointment.patient_id,
        });
        showNotice("cancelled", `Cancelled ${who}'s appointment, ${when(day, time)}.`);
      },
    });
  }

  function reschedule({ doctor, day, appointment, time, who }, opener) {
    const date = el("input", { type: "date", name: "date", required: true, value: day.date });
    const choice = el("select", { name: "slot_id", required: true });
    const found = el("p", { class: "hint desk-hint", role: "status" });
    let zone = day.timezone;
    const fill = async (key) => {
      if (!/^\d{4}-\d{2}-\d{2}$/.test(key)) return;
      choice.replaceChildren();
      found.textContent = "Looking for free times…";
      try {
        const free = await freeTimes(doctor.id, key);
        if (date.value !== key) return; // another day was picked meanwhile
        zone = free.zone;
        choice.replaceChildren(...free.slots.map((slot) => el("option", { value: slot.id }, timeHM(slot.start, zone))));
        const n = free.slots.length;
        found.textContent = n ? `${n} free ${n === 1 ? "time" : "times"} on ${dayLong(key)}.` : `No free time on ${dayLong(key)}: pick another day.`;
      } catch {
        found.textContent = errorText("unavailable");
      }
    };
    date.addEventListener("change", () => fill(date.value));
    fill(day.date);
    openDialog({
      title: `Move ${who}'s appointment`,
      intro: `Now ${when(day, time)} with ${doctor.name}. Pick a free time; the old one is freed in the same step.`,
      fields: [field("New day", date), field("New time", choice), found],
      submit: "Move appointment",
      opener,
      run: async (form) => {
        const slotId = Number(new FormData(form).get("slot_id"));
        const { body } = await command(`desk-move:${appointment.id}:${slotId}`, "reschedule", {
          appointment_id: appointment.id,
          slot_id: slotId,
          patient_id: appointment.patient_id,
        });
        const moved = body.appointment.start;
        showNotice("rescheduled", `Moved ${who}'s appointment to ${dayLong(dateKey(moved, zone))} at ${timeHM(moved, zone)}.`);
      },
    });
  }

  return { book, cancel, reschedule };
}
