// Types for @chat-gateway/client (src/index.js). Frames follow docs/protocol.md.

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  POLICY: 1008;
  TOO_BIG: 1009;
  RESTART: 1012;
  TRY_AGAIN: 1013;
  HEARTBEAT: 4000;
  SLOW_CONSUMER: 4001;
  REVOKED: 4003;
  ACCOUNT_DELETED: 4004;
  ABNORMAL: 1006;
}>;

export interface Backoff {
  /** First reconnect bound, doubled per failed attempt (default 250 ms). */
  baseMs: number;
  /** Largest bound (default 30 s). */
  maxMs: number;
  /** After a drain (1012): a random delay up to this (default 5 s). */
  drainSpreadMs: number;
  /** After 1008, 1009 or 4001: at least this, plus jitter (default 5 s). */
  penaltyMs: number;
}

export declare function reconnectDelay(
  code: number,
  attempt: number,
  backoff: Backoff,
  random?: () => number,
): number;

export interface ClientOptions {
  url: string;
  token: string | (() => string | Promise<string>);
  WebSocket?: typeof WebSocket;
  backoff?: Partial<Backoff>;
  seenMax?: number;
  receipts?: boolean;
  /** Reconnect to `hello.home` within this many ms (default 60,000; 0: never). */
  followHomeWithinMs?: number;
  /** Drop and reopen a connection without `hello` after this many ms (default 10,000). */
  connectTimeoutMs?: number;
}

export interface Hello {
  type: 'hello';
  protocol: number;
  user: string;
  device: string;
  heartbeat_interval_ms: number;
  heartbeat_timeout_ms: number;
  body_bytes_max: number;
  message_bytes_max: number;
  home?: string;
}

export interface Message {
  type: 'message';
  message_id: string;
  conversation: string;
  from: string;
  from_device: string;
  to?: string;
  group?: string;
  body: string;
  ts: number;
  media?: { url: string; size: number; sha256: string };
  event?: {
    action: 'created' | 'added' | 'removed' | 'left' | 'promoted' | 'restricted' | 'opened';
    members: string[];
  };
  /** Delete for everyone: this message withdraws the sender's message with this id. */
  deletes?: string;
  /** This message was deleted by its sender (its tombstone: no body). */
  deleted?: true;
}

export interface Sent {
  type: 'sent';
  id: string;
  message_id: string;
  conversation: string;
  ts: number;
  group?: string;
}

export type ClientState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export declare class ChatClient extends EventTarget {
  constructor(options: ClientOptions);
  readonly state: ClientState;
  readonly hello: Hello | null;
  /** Sends not yet answered `sent`, by client id. */
  readonly outbox: Map<string, unknown>;
  start(): this;
  close(): void;
  opened(): Promise<Hello>;
  send(message: {
    to?: string;
    group?: string;
    body?: string;
    bodies?: Record<string, string>;
    media?: { url: string; size: number; sha256: string };
    id?: string;
  }): Promise<Sent>;
  /** Deletes this user's message for everyone (within the node's window). */
  deleteForEveryone(where: { to?: string; group?: string }, messageId: string): Promise<Sent>;
  /**
   * Deletes this user's account (every device closed with 4004, every row
   * removed, tokens refused); resolves with `account_deleted`, then stops.
   */
  deleteAccount(): Promise<{ type: 'account_deleted'; id: string; rows: number }>;
  createGroup(members: string[]): Promise<Sent>;
  addMembers(group: string, members: string[]): Promise<Sent>;
  removeMembers(group: string, members: string[]): Promise<Sent>;
  /** Makes members admins (only an admin may add, remove and promote). */
  promote(group: string, members: string[]): Promise<Sent>;
  /** Only admins post in the group from now on (only an admin may). */
  restrictPosting(group: string): Promise<Sent>;
  /** Every member posts in the group again (only an admin may). */
  openPosting(group: string): Promise<Sent>;
  typing(where: { to?: string; group?: string }): void;
  read(conversation: string, upTo: string, from: string): void;
  presence(users: string[]): Promise<{ type: 'presence'; users: { user: string; online: boolean; last_seen?: number }[] }>;
  history(conversation: string, page?: { before?: string; limit?: number }): Promise<{ type: 'history'; conversation: string; messages: Message[] }>;
  members(group: string): Promise<{ type: 'group_members'; group: string; members: string[] }>;
  devices(user: string): Promise<{ type: 'devices'; user: string; devices: string[] }>;
}
