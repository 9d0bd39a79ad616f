// The protocol client: one WebSocket to /ws speaking slotcast.v1.json
// (docs/protocol.md). Pages use three things:
//
//   conn.request(type, body, {retry}) -> Promise of {type, body}: the reply
//       whose `id` matches; rejects with a ServerError carrying the error code.
//   conn.on(type, handler): server pushes (delta, presence, ...) by type.
//   conn.onReady = async () => {...}: called after every (re)connect and
//       authentication; the page (re)joins its rooms there, resuming with
//       `since`. The same code path serves the first connect and every
//       reconnect, so resuming is not a special case.
//
//   conn.recover(error): a room (or a read onReady needs) could not be joined
//       again; for a transient error (the server's database is down, say) the
//       connection shows the page as not live and runs onReady again after a
//       jittered backoff, until it succeeds. Returns false for other errors,
//       which the page shows itself.
//
// The connection also emits a "state" event (detail: "connecting" | "online" |
// "recovering" | "offline") for the indicator, "autherror" when the token is
// refused, and "tokenexpired" when the token ran out on a live connection: the
// server has then left the private rooms (dashboards, one's appointments), and
// the next setToken() joins them again through onReady.

const SUBPROTOCOL = "slotcast.v1.json";
// Full-jitter backoff: attempt n waits random(0, min(CAP, BASE * 2^n)).
// BASE 1 s makes the first retry land within a second, CAP keeps a long outage
// from stretching retries beyond 10 s.
const BACKOFF_BASE_MS = 1000;
const BACKOFF_CAP_MS = 10_000;
// A dead network often closes nothing: no close frame, no error. An
// application ping that goes unanswered is how we notice and reconnect.
const PING_EVERY_MS = 15_000;
const PING_TIMEOUT_MS = 8_000;
// Codes after which the same command may simply be sent again (same key);
// "offline" is ours: the request never reached the server.
const TRANSIENT = new Set(["busy", "unavailable", "internal", "offline"]);
const MAX_TRANSIENT_RETRIES = 3;
// A command refused as `rate_limited` is resent after the wait the server names,
// if that wait is short enough for a person to be still waiting on it.
const RATE_WAIT_MAX_MS = 10_000;

export class ServerError extends Error {
  constructor(code, message = code) {
    super(message);
    this.name = "ServerError";
    this.code = code;
  }
}

/**
 * Idempotency keys, one per user intention ("hold slot 7", "confirm hold 501").
 * Retrying the same intention (after `busy`, or a reconnect) reuses its key, so
 * the server answers with the first result instead of acting twice; once the
 * outcome is known the key is forgotten and a new intention gets a new key.
 */
export class Intentions {
  constructor() {
    this.keys = new Map();
  }

  key(intention) {
    if (!this.keys.has(intention)) this.keys.set(intention, newKey());
    return this.keys.get(intention);
  }

  /** The outcome is known (success, or an error that changed nothing worth retrying). */
  settle(intention, error = null) {
    if (!error || !TRANSIENT.has(error.code)) this.keys.delete(intention);
  }
}

// crypto.randomUUID exists only in secure contexts (https, localhost); a demo
// served over plain http on a LAN address still has getRandomValues.
function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

const jitter = (maxMs) => Math.random() * maxMs;

export class Connection extends EventTarget {
  constructor({ token = null, url = defaultUrl() } = {}) {
    super();
    this.url = url;
    this.token = token;
    this.state = "connecting";
    this.identity = null; // the `authenticated` body: {subject, role, expires_at}
    this.onReady = async () => {};
    this.handlers = new Map();
    this.ws = null;
    this.ready = false; // welcome received and authenticated: requests may be sent
    this.joined = false; // onReady ran for this socket and its rooms still stand
    this.entering = false; // onReady is running
    this.rejoin = false; // a room failed transiently while onReady ran: run it again
    this.rejoinTimer = null;
    this.rejoinAttempt = 0;
    this.nextId = 1;
    this.pending = new Map(); // request id -> {type, body, retry, attempts, resolve, reject}
    this.outbox = []; // commands sent, unanswered when the socket dropped: resent on the next
    this.attempt = 0;
    this.retryAfterMs = null; // from a `reconnect` notice
    this.reconnectTimer = null;
    this.pingTimer = null;
    this.stopped = false;

    // The browser knows about network changes before the socket does.
    window.addEventListener("offline", () => this.drop());
    window.addEventListener("online", () => this.reconnectNow());
  }

  /** Register the handler for one server push type. */
  on(type, handler) {
    this.handlers.set(type, handler);
    return this;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  /** Close for good (signed out, or the token was refused): no reconnecting. */
  stop() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.cancelRejoin();
    this.drop();
  }

  /**
   * Present a new token (e.g. from the host application) on the live
   * connection. After an expiry (or a refused token at connect) the rooms are
   * gone, so this also joins them again and resends what was in flight.
   */
  async setToken(token) {
    this.token = token;
    if (!this.ready) return; // the next handshake presents it
    const ws = this.ws;
    if (this.joined) {
      if (!(await this.authenticate())) return;
      // Another identity: the server left the private rooms joined as the previous
      // one (its `unwatched` notices came before the reply), so join them again.
      if (this.joined || ws !== this.ws) return;
      this.joined = true;
      await this.enterRooms(ws);
    } else {
      await this.join(ws);
    }
  }

  /**
   * A room could not be (re)joined. Transient errors (the server's database is
   * down or busy) are the connection's business: it shows the page as not live
   * and runs onReady again after a jittered backoff, as often as it takes.
   * "offline" needs nothing: the reconnect re-joins. Returns false for any other
   * error, which the caller shows.
   */
  recover(error) {
    const code = error?.code;
    if (code === "offline") return true;
    if (!TRANSIENT.has(code)) return false;
    if (this.entering) this.rejoin = true;
    else this.scheduleRejoin();
    return true;
  }

  /**
   * Send a request and wait for its reply. With `retry` (commands carrying an
   * idempotency key), a request that was sent but could not be answered because
   * the connection dropped is sent again after reconnecting, with the same body
   * and so the same key: the server then replays the first reply instead of
   * acting twice. A request made while there is no connection is never kept for
   * later, command or not: it fails at once with code "offline". A hold or a
   * block pressed offline and sent by itself seconds after the network came back
   * would act on a calendar the person no longer sees; they press again when the
   * page is live. (The page's onReady re-issues reads and watches anyway.)
   */
  request(type, body = {}, { retry = false } = {}) {
    return new Promise((resolve, reject) => {
      const entry = { type, body, retry, attempts: 0, resolve, reject };
      if (this.ready) this.send(entry);
      else reject(new ServerError("offline"));
    });
  }

  // ---- internals -------------------------------------------------------------

  send(entry) {
    const id = this.nextId++;
    this.pending.set(id, entry);
    this.ws.send(JSON.stringify({ type: entry.type, id, body: entry.body }));
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  connect() {
    let ws;
    try {
      ws = new WebSocket(this.url, SUBPROTOCOL);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.addEventListener("message", (event) => this.receive(event.data));
    ws.addEventListener("close", (event) => this.closed(ws, event.code));
    // An error is always followed by a close; nothing to do here.
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return; // not ours to fix; the protocol never sends anything else
    }
    const { type, id = null, body = {} } = frame;
    if (type === "welcome") {
      this.handshake();
      return;
    }
    if (id !== null && this.pending.has(id)) {
      this.settle(id, type, body ?? {});
      return;
    }
    if (id === null && type === "error" && body?.code === "token_expired") {
      // The server left our private rooms (the `unwatched` notices follow);
      // the page must get a fresh token, and setToken() re-joins.
      this.joined = false;
      this.dispatchEvent(new CustomEvent("tokenexpired"));
      return;
    }
    if (id === null && type === "unwatched") {
      // Sent on its own when the token expired or an `auth` switched identity:
      // the private rooms are gone until setToken() joins them again.
      this.joined = false;
      return;
    }
    if (type === "reconnect") {
      // The instance is draining; it closes with 1012 next. Come back after the
      // delay it picked (spread so that its clients do not all return at once).
      this.retryAfterMs = body.retry_after_ms ?? 0;
      return;
    }
    const handler = this.handlers.get(type);
    if (handler) handler(body ?? {});
    // Unknown push types are ignored: later v1 servers may add some.
  }

  settle(id, type, body) {
    const entry = this.pending.get(id);
    this.pending.delete(id);
    if (type !== "error") {
      entry.resolve({ type, body });
      return;
    }
    if (entry.retry && TRANSIENT.has(body.code) && entry.attempts < MAX_TRANSIENT_RETRIES) {
      // Nothing was changed; try again shortly with the same idempotency key.
      entry.attempts += 1;
      setTimeout(() => (this.ready ? this.send(entry) : this.outbox.push(entry)), jitter(500 * 2 ** entry.attempts));
      return;
    }
    if (entry.retry && body.code === "rate_limited" && entry.attempts < MAX_TRANSIENT_RETRIES && body.retry_after_ms <= RATE_WAIT_MAX_MS) {
      // Too fast: nothing was done. Send it again when the server says, same key.
      entry.attempts += 1;
      setTimeout(() => (this.ready ? this.send(entry) : this.outbox.push(entry)), body.retry_after_ms + jitter(250));
      return;
    }
    entry.reject(new ServerError(body.code, body.message));
  }

  async authenticate() {
    if (!this.token) return true;
    try {
      const reply = await this.request("auth", { token: this.token });
      this.identity = reply.body;
      return true;
    } catch (error) {
      if (error.code === "offline") return false;
      this.dispatchEvent(new CustomEvent("autherror", { detail: error }));
      return false;
    }
  }

  async handshake() {
    this.ready = true;
    this.attempt = 0;
    this.startPings();
    await this.join(this.ws);
  }

  /** Authenticate, (re)join the page's rooms, then resend what waited. */
  async join(ws) {
    const authenticated = await this.authenticate();
    // Dropped while authenticating; or refused: nothing is sent with a token
    // the server does not take (it would only fail), until setToken() brings one.
    if (ws !== this.ws || !authenticated) return;
    this.joined = true;
    await this.enterRooms(ws);
  }

  /** Run the page's onReady; live once every room is back, else retried (recover). */
  async enterRooms(ws) {
    this.cancelRejoin();
    this.rejoin = false;
    this.entering = true;
    try {
      await this.onReady();
    } catch (error) {
      if (ws === this.ws && !this.recover(error)) console.warn("re-joining rooms failed", error);
    } finally {
      this.entering = false;
    }
    if (ws !== this.ws || !this.joined) return;
    if (this.rejoin) {
      this.scheduleRejoin();
      return;
    }
    this.rejoinAttempt = 0;
    this.setState("online");
    // Commands whose reply never came: send them again, keys unchanged.
    const waiting = this.outbox.splice(0);
    for (const entry of waiting) this.send(entry);
  }

  /** Not live: run onReady again on this socket after a jittered, capped backoff. */
  scheduleRejoin() {
    const ws = this.ws;
    if (!ws || this.stopped || this.rejoinTimer !== null) return;
    this.setState("recovering");
    const delay = jitter(Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** this.rejoinAttempt));
    this.rejoinAttempt += 1;
    this.rejoinTimer = setTimeout(() => {
      this.rejoinTimer = null;
      if (ws === this.ws && this.joined && !this.entering) this.enterRooms(ws);
    }, delay);
  }

  cancelRejoin() {
    clearTimeout(this.rejoinTimer);
    this.rejoinTimer = null;
  }

  closed(ws, code) {
    if (ws !== this.ws) return; // an old socket we already gave up on
    this.ws = null;
    this.ready = false;
    this.joined = false;
    this.cancelRejoin();
    this.rejoinAttempt = 0;
    this.stopPings();
    // Unanswered commands are kept to resend; reads are failed (onReady redoes them).
    for (const entry of this.pending.values()) {
      if (entry.retry) this.outbox.push(entry);
      else entry.reject(new ServerError("offline"));
    }
    this.pending.clear();
    this.setState("offline");
    if (code === 1012 && this.retryAfterMs === null) this.retryAfterMs = BACKOFF_BASE_MS;
    // Closed for sending too fast (4029): come back slowly.
    if (code === 4029 && this.retryAfterMs === null) this.retryAfterMs = BACKOFF_CAP_MS;
    this.scheduleReconnect();
  }

  scheduleReconnect() {
    if (this.stopped || this.reconnectTimer !== null) return;
    let delay;
    if (this.retryAfterMs !== null) {
      delay = this.retryAfterMs + jitter(500);
      this.retryAfterMs = null;
    } else {
      delay = jitter(Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** this.attempt));
      this.attempt += 1;
    }
    this.reconnectTimer = setTimeout(() => {
      // While the browser knows it is offline, trying only fails; its "online"
      // event reconnects at once (reconnectNow), so just keep the timer going.
      this.reconnectTimer = null;
      if (navigator.onLine === false) this.scheduleReconnect();
      else this.connect();
    }, delay);
  }

  /** Give up on the current socket now (network gone, or pings unanswered). */
  drop() {
    const ws = this.ws;
    if (!ws) return;
    this.closed(ws, 1006);
    try {
      ws.close();
    } catch {
      // already closing
    }
  }

  /** The network is back: skip the rest of the backoff wait. */
  reconnectNow() {
    if (this.stopped || this.ws || this.reconnectTimer === null) return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.attempt = 0;
    this.connect();
  }

  startPings() {
    this.stopPings();
    this.pingTimer = setInterval(() => {
      const ws = this.ws;
      const timeout = setTimeout(() => ws === this.ws && this.drop(), PING_TIMEOUT_MS);
      this.request("ping").then(
        () => clearTimeout(timeout),
        () => clearTimeout(timeout),
      );
    }, PING_EVERY_MS);
  }

  stopPings() {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
  }
}
