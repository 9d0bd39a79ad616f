// Every error code of protocol/errors.py, in words a patient or a receptionist
// can act on. The server's own `message` is for developers and may change, so
// the pages never show it; they branch on the stable `code` only.

const ERROR_TEXT = {
  bad_message: "The page sent something the server could not read. Please reload the page.",
  unknown_type: "This page is out of date with the server. Please reload the page.",
  invalid: "That request was not accepted. Please check it and try again.",
  too_large: "That request was too large to send.",
  unauthenticated: "Please sign in to do that.",
  token_invalid: "Your sign-in is not valid any more. Please sign in again.",
  token_expired: "Your session has expired. Please sign in again.",
  forbidden: "Your account is not allowed to do that.",
  not_found: "We could not find that doctor, slot or appointment. It may have just been removed.",
  slot_taken: "Someone else just took that slot. Please pick another one.",
  slot_unavailable: "That slot is no longer offered. Please pick another one.",
  too_late: "That slot is too soon to book. Please pick a later one.",
  outside_horizon: "That slot is too far ahead to book yet. Please pick an earlier one.",
  hold_expired: "Your hold ran out before it was confirmed. The slot is open to other patients for a few minutes: please pick another one.",
  not_holder: "That hold belongs to someone else.",
  hold_limit: "You are already holding as many slots as allowed. Confirm or release one first.",
  appointment_limit: "You already have as many upcoming appointments as one patient may have (with this doctor, or in all). Cancel one you no longer need first.",
  cooldown: "You gave this slot back a moment ago, so it is open to other patients for a few minutes. Please pick another slot, or try again later.",
  invalid_transition: "That change no longer applies: it was changed meanwhile. The page shows what stands now.",
  too_early: "Too early: attendance can be recorded only once the appointment's time has come.",
  doctor_retired: "This doctor no longer takes appointments here. Please search for another doctor.",
  idempotency_conflict: "That request clashed with an earlier one. Please try again.",
  limit_exceeded: "Too many calendars are open on this connection. Close one and try again.",
  rate_limited: "That was a lot of requests in a short time. Please wait a moment, then try again.",
  busy: "The clinic's calendar is busy right now. Please try again in a moment.",
  unavailable: "The service is briefly unavailable. Please try again in a moment.",
  internal: "Something went wrong on our side. Please try again.",
  // Not a server code: a request could not be sent because the connection is down.
  offline: "You are offline. We will reconnect and you can try again.",
};

/** The human text for an error code; unknown codes read like `internal`, as the protocol asks. */
export function errorText(code) {
  return ERROR_TEXT[code] ?? ERROR_TEXT.internal;
}

/** The code to show for an error: server codes pass through, anything else is `internal`. */
export function errorCode(error) {
  const code = error?.code;
  return typeof code === "string" && code in ERROR_TEXT ? code : "internal";
}

// Appointment statuses in words, for patients and for the doctor's timeline.
const STATUS_WORDS = {
  pending: "On hold",
  booked: "Booked",
  arrived: "Arrived",
  fulfilled: "Fulfilled",
  cancelled: "Cancelled",
  noshow: "No-show",
};

export function statusWords(status) {
  return STATUS_WORDS[status] ?? status;
}
