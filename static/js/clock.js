// The server's clock, as well as the browser can tell. Holds lapse, tokens
// expire and slots become bookable by the server's clock (docs/protocol.md,
// "Holds": "client clocks drift, and the server's clock decides"); a browser
// whose clock is a few minutes fast would otherwise call a fresh hold expired
// at once, and one that is slow would count past the real expiry.

let offsetMs = 0; // server time minus browser time

/** Now, in milliseconds since the epoch, by the server's clock. */
export const serverNow = () => Date.now() + offsetMs;

/**
 * Learn the offset from an HTTP response's `Date` header (any same-origin
 * response: the server stamps them all). The header has whole seconds, so an
 * offset within that resolution plus the round trip is noise: the browser's
 * own clock is then the better one.
 */
export function learnServerTime(response, sentAt, receivedAt) {
  const stamped = Date.parse(response.headers.get("Date") ?? "");
  if (Number.isNaN(stamped)) return;
  // The server's time was somewhere in [stamped, stamped + 1 s) while the request was answered.
  const estimate = stamped + 500 - (sentAt + receivedAt) / 2;
  offsetMs = Math.abs(estimate) > 1500 + (receivedAt - sentAt) / 2 ? estimate : 0;
}
