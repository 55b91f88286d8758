// Types for parley.js: parley's JavaScript client.

/** `getToken` answers the JWT; `refresh` is true after the server refused the last one. */
export type GetToken = (ctx: { refresh: boolean }) => string | Promise<string>;

/** A new message, as the chat socket sends it (and history lists it, with `edited`). */
export interface Message {
  id: number;
  sender: string;
  content: string;
  /** UTC, RFC 3339, `Z` suffix. */
  timestamp: string;
  edited?: boolean;
}

export interface Notification {
  id: number;
  message: string;
  is_read: boolean;
  timestamp: string;
}

export interface Conversation {
  id: number;
  title: string | null;
  participants: string[];
  created_at: string;
}

export type ErrorCode =
  | "invalid_json"
  | "unknown_type"
  | "invalid_field"
  | "too_large"
  | "not_found"
  | "forbidden"
  | "rate_limited"
  | "unavailable";

/** An error frame: answers the frame this socket sent; the socket stays open. */
export interface ErrorFrame {
  type: "error";
  code: ErrorCode;
  detail: string;
}

export interface ConnectionEvents {
  open: { resumedAfter: number | null };
  message: Message;
  edited: { id: number; content: string };
  deleted: { id: number };
  notification: Notification;
  error: ErrorFrame;
  /** More was missed than the server replays: the replay starts after `after`;
   *  page the history API back from `after` to `lastSeen` to fill the gap. */
  truncated: { after: number; lastSeen: number | null };
  reconnecting: { attempt: number; delay: number };
  close: { code: number; reason: string; reconnect: boolean };
  /** The socket gave up: the conversation does not exist or the user is not in it. */
  failed: { reason: "forbidden" | "not_found" | "token" | "url"; status?: number; error?: unknown };
  unknown: unknown;
}

export interface ConnectOptions {
  /** Resume after this message id (chat) or notification id (notifications); 0: from the start. */
  after?: number;
  /** First reconnect delay ceiling in ms (default 250); doubles per attempt. */
  initialDelay?: number;
  /** Largest reconnect delay in ms (default 15000). */
  maxDelay?: number;
  /** A WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: unknown;
  /** A fetch (default: globalThis.fetch), used to tell a 401 from a 403/404 after a refused upgrade. */
  fetch?: typeof fetch;
}

export class Connection {
  readonly kind: "chat" | "notifications";
  readonly conversation: number | null;
  /** Newest message (chat) or notification id seen; a reconnect resumes after it. */
  lastId: number | null;
  state: "connecting" | "open" | "waiting" | "closed";
  on<K extends keyof ConnectionEvents>(type: K, fn: (e: ConnectionEvents[K]) => void): () => void;
  off<K extends keyof ConnectionEvents>(type: K, fn: (e: ConnectionEvents[K]) => void): void;
  /** Answers false when the socket is not open (nothing is queued). */
  send(text: string): boolean;
  edit(messageId: number, content: string): boolean;
  delete(messageId: number): boolean;
  /** Closes for good: no reconnect. */
  close(): void;
}

/** A chat (`/ws/chat/<id>/`) or notifications (`/ws/notifications/`) socket that reconnects and resumes. */
export function connect(url: string, getToken: GetToken, options?: ConnectOptions): Connection;

export class ParleyError extends Error {
  status: number;
  code: string;
  detail: string;
}

export interface Page<T> {
  results: T[];
  /** Pass as `before` for the next, older page; null when none remains. */
  next: number | null;
}

export class Parley {
  /** `baseUrl` such as `http://127.0.0.1:8000`; "" in a page parley serves. */
  constructor(baseUrl: string, getToken: GetToken, options?: { fetch?: typeof fetch; WebSocket?: unknown });
  chat(id: number, options?: ConnectOptions): Connection;
  notifications(options?: ConnectOptions): Connection;
  conversations(): Promise<Conversation[]>;
  createConversation(body?: { participants?: string[]; title?: string | null }): Promise<Conversation>;
  conversation(id: number): Promise<Conversation>;
  messages(id: number, page?: { before?: number; limit?: number }): Promise<Page<Message>>;
  notificationsPage(page?: { unread?: boolean; before?: number; limit?: number }): Promise<Page<Notification>>;
  unreadCount(): Promise<number>;
  markRead(id: number): Promise<Notification>;
  readAll(): Promise<number>;
  /** Service tokens only. */
  notify(user: string, message: string): Promise<Notification>;
  health(): Promise<{ status: string; detail?: string }>;
  metrics(): Promise<string>;
  /** Any API call; throws ParleyError; retries once with a refreshed token after a 401. */
  request<T = unknown>(method: string, path: string, body?: unknown): Promise<T>;
}

/** Prometheus text → `{ 'name{label="v"}': value }`. */
export function parseMetrics(text: string): Record<string, number>;
