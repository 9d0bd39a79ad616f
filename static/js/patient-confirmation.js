// The patient page's confirmation view, shown after a booking or a reschedule
// in place of a passing message: whom, when (the patient's time, and the
// clinic's when its clock differs), how long, where, and "Add to calendar".
// Focus moves to its heading, so a screen reader says what happened and a
// keyboard user is next to what they may want to do with it.
//
// "Add to calendar" downloads the appointment's .ics from the server (RFC 5545,
// GET /api/appointments/{id}.ics). That route wants the bearer token like every
// API call, which a plain link cannot send, so the file is fetched and handed to
// the browser as a download.

import { ServerError } from "./connection.js";
import { patientWhen, sameOffset } from "./format.js";

const $ = (selector) => document.querySelector(selector);
const CALENDAR_FETCH_MS = 10_000; // a download that hangs is reported, not waited on forever

/** The clinic's name from the page's meta tag (SLOTCAST_CLINIC_NAME), or "". */
function clinicName() {
  return document.querySelector('meta[name="slotcast-clinic"]')?.content.trim() ?? "";
}

/** `page`: {conn, zone, doctors, fail, doctorZone}. `onClose()`: where focus goes after "Done". */
export function confirmationView(page, { onClose }) {
  let shown = null; // the appointment the view is about

  function field(name) {
    return $(`#confirmation [data-field="${name}"]`);
  }

  /** Show a booked appointment; `moved`: it replaced an earlier one (a reschedule). */
  function show(appointment, { moved = false } = {}) {
    shown = appointment;
    const doctor = page.doctors.byId.get(appointment.doctor_id);
    const doctorZone = page.doctorZone(appointment.doctor_id);
    $("#confirmation-h").textContent = moved ? "Your appointment is moved" : "You are booked";
    field("doctor").textContent = page.doctors.name(appointment.doctor_id);
    field("when").textContent = patientWhen(appointment.start, page.zone, doctorZone);
    const differs = Boolean(doctorZone) && !sameOffset(page.zone, doctorZone, Date.parse(appointment.start));
    field("clinic-when").hidden = !differs;
    field("clinic-when-label").hidden = !differs;
    field("clinic-when").textContent = differs ? patientWhen(appointment.start, doctorZone, doctorZone) : "";
    const minutes = Math.round((Date.parse(appointment.end) - Date.parse(appointment.start)) / 60_000);
    field("length").textContent = `${minutes} minutes`;
    // The directory has no addresses yet; a doctor's own, once it has, comes first.
    field("place").textContent = doctor?.address || doctor?.location || clinicName() || "At the clinic";
    field("reason").textContent = appointment.visit_reason ?? "";
    field("reason").hidden = field("reason-label").hidden = !appointment.visit_reason;
    const view = $("#confirmation");
    view.dataset.appointmentId = appointment.id;
    view.hidden = false;
    view.scrollIntoView({ block: "nearest" });
    $("#confirmation-h").focus();
  }

  /** The appointment changed meanwhile (cancelled, moved again): the view would be wrong. */
  function update(appointment) {
    if (shown?.id === appointment.id && appointment.status === "cancelled") close({ focus: false });
  }

  function close({ focus = true } = {}) {
    const view = $("#confirmation");
    const hadFocus = view.contains(document.activeElement);
    view.hidden = true;
    shown = null;
    if (focus && hadFocus) onClose();
  }

  async function addToCalendar() {
    if (!shown) return;
    const id = shown.id;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), CALENDAR_FETCH_MS);
    try {
      const response = await fetch(`/api/appointments/${id}.ics`, {
        headers: { Authorization: `Bearer ${page.conn.token}` },
        signal: abort.signal,
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new ServerError(body?.error?.code ?? "internal");
      }
      const url = URL.createObjectURL(await response.blob());
      const link = document.createElement("a");
      link.href = url;
      link.download = `appointment-${id}.ics`;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (error) {
      page.fail(error instanceof ServerError ? error : new ServerError(navigator.onLine ? "unavailable" : "offline"));
    } finally {
      clearTimeout(timer);
    }
  }

  $("#add-to-calendar").addEventListener("click", addToCalendar);
  $("#close-confirmation").addEventListener("click", () => close());
  return { show, update, close };
}
