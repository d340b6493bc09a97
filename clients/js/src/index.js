// @ts-check
/**
 * A client for the chat gateway's WebSocket protocol (docs/protocol.md), for
 * browsers and Node.js (20 with --experimental-websocket, or 22+).
 *
 * Owns one connection at a time and what survives its loss: the outbox
 * (every send not yet answered `sent`, resent with its same `id` after a
 * reconnect, so the server's idempotency makes it exactly once), the ids
 * of recent messages (a repeat after a resync or a retry is never shown
 * twice), acknowledgements, heartbeats, and reconnection with exponential
 * back-off and full jitter that follows the gateway's close codes. Never
 * decrypts or encrypts: `body` is whatever the application passes.
 */

/** Close codes the gateway uses (docs/protocol.md, "Close codes"). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  POLICY: 1008,
  TOO_BIG: 1009,
  RESTART: 1012,
  TRY_AGAIN: 1013,
  HEARTBEAT: 4000,
  SLOW_CONSUMER: 4001,
  REVOKED: 4003,
  /** The account was deleted (by its user or an operator): the client stops. */
  ACCOUNT_DELETED: 4004,
  /** Not sent by the gateway: what a client reports for a connection lost without a close frame. */
  ABNORMAL: 1006,
});

/** Errors after which the same send is retried (after `retry_after_ms`). */
const RETRYABLE = new Set(['rate_limited', 'overloaded', 'unavailable']);

/**
 * How long to wait before reconnecting after a close with `code`, on the
 * `attempt`-th try in a row. Full jitter: a uniformly random delay up to
 * the exponential bound, so a fleet of clients never reconnects in step.
 * @param {number} code
 * @param {number} attempt
 * @param {{baseMs: number, maxMs: number, drainSpreadMs: number, penaltyMs: number}} backoff
 * @param {() => number} [random]
 */
export function reconnectDelay(code, attempt, backoff, random = Math.random) {
  const bound = (base) => Math.min(backoff.maxMs, base * 2 ** Math.min(attempt, 16));
  switch (code) {
    case CloseCode.RESTART:
      // A drain: the node closes its clients over a window; spread again.
      return random() * backoff.drainSpreadMs;
    case CloseCode.POLICY:
    case CloseCode.SLOW_CONSUMER:
    case CloseCode.TOO_BIG:
    case CloseCode.REVOKED:
      // This client misbehaved or could not keep up: back off for longer.
      return backoff.penaltyMs + random() * bound(backoff.penaltyMs);
    default:
      return random() * bound(backoff.baseMs);
  }
}

let counter = 0;
/** A client message id: unique per device across restarts of the page. */
function newId() {
  counter += 1;
  const random = Math.floor(Math.random() * 2 ** 32).toString(36);
  return `c-${Date.now().toString(36)}-${random}-${counter}`;
}

/**
 * @typedef {object} ClientOptions
 * @property {string} url the WebSocket endpoint, e.g. `wss://chat.example/ws`
 * @property {string | (() => string | Promise<string>)} token a token, or a
 *   function asked for one before every connect (so it can be refreshed)
 * @property {typeof WebSocket} [WebSocket] the WebSocket class (default: the global one)
 * @property {Partial<{baseMs: number, maxMs: number, drainSpreadMs: number, penaltyMs: number}>} [backoff]
 * @property {number} [seenMax] message ids remembered to drop repeats (default 5,000)
 * @property {boolean} [receipts] acknowledge with a delivered receipt (default true)
 * @property {number} [followHomeWithinMs] in a fleet, when `hello` names the
 *   user's home node, reconnect there at a random moment within this many
 *   milliseconds (default 60,000; 0 never moves)
 * @property {number} [connectTimeoutMs] a connection without `hello` this
 *   long after it was opened is dropped and tried again (default 10,000). A
 *   server killed mid-handshake can leave a socket that never reports a
 *   close, and without this bound the client would wait on it forever.
 */

export class ChatClient extends EventTarget {
  /** @param {ClientOptions} options */
  constructor(options) {
    super();
    if (!options || !options.url) throw new TypeError('ChatClient needs a url');
    this.url = options.url;
    const token = options.token;
    this.refreshable = typeof token === 'function';
    this.getToken = this.refreshable ? token : async () => token;
    this.WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocketClass) throw new TypeError('no WebSocket class: pass options.WebSocket');
    this.backoff = { baseMs: 250, maxMs: 30_000, drainSpreadMs: 5_000, penaltyMs: 5_000, ...options.backoff };
    this.seenMax = options.seenMax ?? 5_000;
    this.receipts = options.receipts ?? true;
    this.followHomeWithinMs = options.followHomeWithinMs ?? 60_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    /** @type {Map<string, {frame: object, resolve: (v: any) => void, reject: (e: any) => void, timer?: any}>} */
    this.outbox = new Map();
    /** @type {Set<string>} */
    this.seen = new Set();
    /** @type {string[]} */
    this.seenOrder = [];
    /** @type {WebSocket | null} */
    this.socket = null;
    /** @type {any} */
    this.hello = null;
    this.state = 'idle';
    this.attempt = 0;
    this.stopped = true;
    this.timers = { reconnect: null, ping: null, silence: null, home: null, handshake: null };
    /** Answers waited for by kind (history by conversation, members by group). */
    this.waiting = new Map();
  }

  /** Connects, and keeps reconnecting until `close()`. */
  start() {
    if (!this.stopped) return this;
    this.stopped = false;
    this.#connect();
    return this;
  }

  /** Closes for good (the outbox is kept: `start()` again resends it). */
  close() {
    this.stopped = true;
    clearTimeout(this.timers.reconnect);
    this.#stopTimers();
    if (this.socket) this.socket.close(CloseCode.NORMAL, 'bye');
    this.#setState('closed');
  }

  /** Resolves once connected (after `hello`). */
  opened() {
    if (this.state === 'open') return Promise.resolve(this.hello);
    return new Promise((resolve) => this.addEventListener('open', (e) => resolve(/** @type {any} */ (e).detail), { once: true }));
  }

  /**
   * Sends a message; resolves with the `sent` frame once it is durable.
   * Kept in the outbox and resent with the same `id` after every reconnect
   * until then. Rejects on an error that retrying cannot fix.
   * @param {{to?: string, group?: string, body?: string, bodies?: Record<string, string>, media?: object, id?: string}} message
   */
  send(message) {
    const id = message.id ?? newId();
    const frame = { type: 'send', id, ...message };
    return this.#request(id, frame);
  }

  /**
   * Deletes this user's message `messageId` for everyone in its
   * conversation (`to` the other user, or `group`), within the node's
   * `delete_window_ms`. Every device then gets a `message` with `deletes`,
   * and history and sync show the message as `deleted` with no body.
   * Resolves with `sent`; rejects with `forbidden` for someone else's
   * message or a late delete.
   * @param {{to?: string, group?: string}} where @param {string} messageId
   */
  deleteForEveryone(where, messageId) {
    const id = newId();
    return this.#request(id, { type: 'send', id, ...where, delete: messageId });
  }

  /**
   * Deletes this user's account: every device of theirs is closed (4004),
   * every row of theirs is removed, and their tokens stop working; what they
   * sent stays in the other side's history. Resolves with `account_deleted`
   * (`rows` removed); the client then stops. Rejects if not connected.
   */
  deleteAccount() {
    const user = this.hello?.user;
    if (!user) return Promise.reject(new Error('deleteAccount needs a connection (after hello)'));
    const id = newId();
    return this.#request(id, { type: 'delete_account', id, user });
  }

  /** @param {string[]} members */
  createGroup(members) {
    const id = newId();
    return this.#request(id, { type: 'group_create', id, members });
  }

  /** @param {string} group @param {string[]} members */
  addMembers(group, members) {
    const id = newId();
    return this.#request(id, { type: 'group_add', id, group, members });
  }

  /** Makes members admins (only an admin may). @param {string} group @param {string[]} members */
  promote(group, members) {
    const id = newId();
    return this.#request(id, { type: 'group_promote', id, group, members });
  }

  /** Only admins post from now on (only an admin may). @param {string} group */
  restrictPosting(group) {
    const id = newId();
    return this.#request(id, { type: 'group_restrict', id, group });
  }

  /** Every member posts again (only an admin may). @param {string} group */
  openPosting(group) {
    const id = newId();
    return this.#request(id, { type: 'group_open', id, group });
  }

  /** @param {string} group @param {string[]} members */
  removeMembers(group, members) {
    const id = newId();
    return this.#request(id, { type: 'group_remove', id, group, members });
  }

  /** @param {{to?: string, group?: string}} where */
  typing(where) {
    this.#send({ type: 'typing', ...where });
  }

  /**
   * Everything up to `upTo` in `conversation` was read (a read receipt to `from`).
   * @param {string} conversation @param {string} upTo @param {string} from
   */
  read(conversation, upTo, from) {
    this.#send({ type: 'read', conversation, up_to: upTo, from });
  }

  /** @param {string[]} users @returns {Promise<any>} the `presence` answer */
  presence(users) {
    return this.#ask('presence', '', { type: 'presence', users });
  }

  /**
   * A page of `conversation`, newest first.
   * @param {string} conversation @param {{before?: string, limit?: number}} [page]
   */
  history(conversation, page = {}) {
    return this.#ask('history', conversation, { type: 'history', conversation, ...page });
  }

  /**
   * The devices of `user` that uploaded keys (for per-device `bodies`).
   * @param {string} user
   */
  devices(user) {
    return this.#ask('devices', user, { type: 'devices', user });
  }

  /** @param {string} group */
  members(group) {
    return this.#ask('group_members', group, { type: 'group_members', group });
  }

  /** @param {object} frame */
  #request(id, frame) {
    return new Promise((resolve, reject) => {
      this.outbox.set(id, { frame, resolve, reject });
      this.#send(frame);
    });
  }

  #ask(kind, key, frame) {
    return new Promise((resolve, reject) => {
      const list = this.waiting.get(kind + '\u0000' + key) ?? [];
      list.push({ resolve, reject });
      this.waiting.set(kind + '\u0000' + key, list);
      this.#send(frame);
    });
  }

  #answer(kind, key, frame) {
    const slot = kind + '\u0000' + key;
    const list = this.waiting.get(slot);
    if (!list || list.length === 0) return false;
    list.shift().resolve(frame);
    if (list.length === 0) this.waiting.delete(slot);
    return true;
  }

  /** Sends now if open (else the outbox or the caller's retry covers it). */
  #send(frame) {
    if (this.socket && this.state === 'open') this.socket.send(JSON.stringify(frame));
  }

  #setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent('state', { detail: state }));
  }

  async #connect() {
    if (this.stopped) return;
    this.#setState('connecting');
    let token;
    try {
      token = await this.getToken();
    } catch (error) {
      this.#emit('error', { code: 'token', message: String(error) });
      this.#scheduleReconnect(0);
      return;
    }
    if (this.stopped) return;
    const separator = this.url.includes('?') ? '&' : '?';
    const socket = new this.WebSocketClass(`${this.url}${separator}token=${encodeURIComponent(token)}`);
    this.socket = socket;
    clearTimeout(this.timers.handshake);
    this.timers.handshake = setTimeout(() => this.#abandon(socket), this.connectTimeoutMs);
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.#heard();
      let frame;
      try {
        frame = JSON.parse(String(event.data));
      } catch {
        return;
      }
      this.#onFrame(frame);
    };
    socket.onclose = (event) => this.#lost(socket, event.code, event.reason);
    socket.onerror = () => {};
  }

  /** The connection `socket` ended with `code`: report it and reconnect. */
  #lost(socket, code, reason) {
    if (this.socket !== socket) return;
    this.socket = null;
    this.#stopTimers();
    // A deleted account is gone for good: stopped before anyone hears of it.
    if (code === CloseCode.ACCOUNT_DELETED) this.stopped = true;
    this.#setState(this.stopped ? 'closed' : 'reconnecting');
    this.#emit('close', { code, reason });
    if (code === CloseCode.ACCOUNT_DELETED) {
      // Nothing still queued will ever be answered.
      for (const [id, entry] of this.outbox) {
        clearTimeout(entry.timer);
        entry.reject(Object.assign(new Error('the account was deleted'), { code: 'account_deleted' }));
        this.outbox.delete(id);
      }
      return;
    }
    if (code === CloseCode.REVOKED) {
      // The operator revoked this device: the same token will never work
      // again. Only a token function (which may sign in anew) retries.
      this.#emit('revoked', { reason });
      if (!this.refreshable) {
        this.stopped = true;
        this.#setState('closed');
        return;
      }
    }
    if (!this.stopped) this.#scheduleReconnect(code);
  }

  /**
   * Drops a socket that did not reach `hello` in time, as if it had closed
   * abnormally (1006), and reconnects. Its later events are ignored: they
   * check `this.socket === socket`.
   */
  #abandon(socket) {
    if (this.socket !== socket || this.stopped) return;
    this.#lost(socket, CloseCode.ABNORMAL, 'no hello within connectTimeoutMs');
    try {
      socket.close();
    } catch {
      // A socket that cannot even be closed is dropped all the same.
    }
  }

  #scheduleReconnect(code) {
    const delay = reconnectDelay(code, this.attempt, this.backoff);
    this.attempt += 1;
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => this.#connect(), delay);
  }

  #stopTimers() {
    clearTimeout(this.timers.handshake);
    clearInterval(this.timers.ping);
    clearTimeout(this.timers.silence);
    clearTimeout(this.timers.home);
  }

  /**
   * This node is not the user's home: move there at a random moment (never
   * at once: after a deploy every client would move together). The node
   * serves this device fully meanwhile, so nothing waits for the move.
   */
  #followHome(home) {
    if (!home || this.followHomeWithinMs <= 0 || home === this.url) return;
    const socket = this.socket;
    this.timers.home = setTimeout(() => {
      if (this.socket !== socket || this.stopped) return;
      this.url = home;
      this.attempt = 0;
      // Closing reconnects (after a jittered delay) to the new url.
      socket.close(CloseCode.NORMAL, 'moving to home node');
    }, Math.random() * this.followHomeWithinMs);
  }

  /** Something arrived: the server is alive. */
  #heard() {
    clearTimeout(this.timers.silence);
    const timeout = this.hello?.heartbeat_timeout_ms;
    if (!timeout) return;
    const socket = this.socket;
    this.timers.silence = setTimeout(() => {
      // Silent past the timeout: treat the connection as lost.
      if (socket && this.socket === socket) socket.close(CloseCode.NORMAL, 'silent server');
    }, timeout);
  }

  #remember(id) {
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    this.seenOrder.push(id);
    if (this.seenOrder.length > this.seenMax) this.seen.delete(/** @type {string} */ (this.seenOrder.shift()));
    return true;
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #onFrame(frame) {
    switch (frame.type) {
      case 'hello': {
        this.hello = frame;
        this.attempt = 0;
        clearTimeout(this.timers.handshake);
        this.#setState('open');
        // The server wants activity at least every interval.
        const every = Math.max(1_000, Math.floor(frame.heartbeat_interval_ms / 2));
        this.timers.ping = setInterval(() => this.#send({ type: 'ping' }), every);
        this.#heard();
        // Everything not yet answered goes again, with its id: the server
        // answers a repeat with the first answer and stores nothing twice.
        for (const entry of this.outbox.values()) this.#send(entry.frame);
        this.#followHome(frame.home);
        this.#emit('open', frame);
        break;
      }
      case 'message':
      case 'receipts': {
        const fresh = this.#remember(frame.message_id);
        const ack = { type: 'ack', message_id: frame.message_id };
        if (this.receipts && frame.type === 'message' && frame.conversation && frame.from && frame.from !== this.hello?.user) {
          Object.assign(ack, { conversation: frame.conversation, from: frame.from });
        }
        this.#send(ack);
        if (fresh) this.#emit(frame.type, frame);
        break;
      }
      case 'sent':
      case 'account_deleted': {
        const entry = this.outbox.get(frame.id);
        if (entry) {
          clearTimeout(entry.timer);
          this.outbox.delete(frame.id);
          entry.resolve(frame);
        }
        break;
      }
      case 'error': {
        const entry = frame.id !== undefined ? this.outbox.get(frame.id) : undefined;
        if (entry && RETRYABLE.has(frame.code)) {
          clearTimeout(entry.timer);
          const wait = (frame.retry_after_ms ?? 1_000) + Math.random() * 250;
          entry.timer = setTimeout(() => this.#send(entry.frame), wait);
        } else if (entry) {
          this.outbox.delete(frame.id);
          entry.reject(Object.assign(new Error(frame.message), { code: frame.code, frame }));
        } else {
          this.#failWaiting(frame);
          this.#emit('error', frame);
        }
        break;
      }
      case 'synced':
        if (frame.more && frame.last) this.#send({ type: 'sync', after: frame.last });
        this.#emit('synced', frame);
        break;
      case 'history':
        if (!this.#answer('history', frame.conversation, frame)) this.#emit('history', frame);
        break;
      case 'group_members':
        if (!this.#answer('group_members', frame.group, frame)) this.#emit('group_members', frame);
        break;
      case 'devices':
        if (!this.#answer('devices', frame.user, frame)) this.#emit('devices', frame);
        break;
      case 'presence':
        if (!this.#answer('presence', '', frame)) this.#emit('presence', frame);
        break;
      case 'pong':
        break;
      default:
        this.#emit(frame.type, frame);
    }
  }

  /** An error with no `id` answers the oldest question of its kind, if any. */
  #failWaiting(frame) {
    for (const [slot, list] of this.waiting) {
      if (list.length > 0 && frame.code === 'forbidden') {
        list.shift().reject(Object.assign(new Error(frame.message), { code: frame.code, frame }));
        if (list.length === 0) this.waiting.delete(slot);
        return;
      }
    }
  }
}
