// Chat demo page: dev login, room list with kinds, roles and unread counts, room membership, a
// resumable websocket per room, message edits, deletes, reactions and replies, read cursors,
// who is here (presence) and who is typing.
// Plain browser JS, no build step. All user-supplied text is rendered with textContent.
'use strict';

const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/; // user and room names (same rule as the server)
const MAX_CHARS = 4000;                   // server default for max_message_chars
const HISTORY = 50;                       // messages replayed on a fresh join
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const PING_EVERY_MS = 20_000;             // keep-alive; the server answers {"type":"pong"}
const STALE_AFTER_MS = 45_000;            // no frame at all for this long: treat as dropped
const RETRYABLE = new Set(['rate_limited', 'unavailable', 'overloaded', 'outcome_unknown']);
const CLOSE_REASONS = {
  1000: 'server closed the connection',
  1001: 'server going away',
  1006: 'connection lost',
  1009: 'frame too big',
  1011: 'server error',
  1012: 'service restarting',
  1013: 'server busy',
  4000: 'connection stalled',
  4001: 'simulated drop',
  4002: 'offline',
  4401: 'token expired',
  4403: 'no access to this room',
};
const RENEW_MIN_LEAD_MS = 60_000;         // renew the token at least this long before `exp`…
const RENEW_RETRY_MS = 15_000;            // …and, if that fails, try again this often until then
const PAGE = 100;                         // REST page size for lists with `next_after`
const MAX_ROOMS = 1000;                   // the room list stops loading pages past this
const MAX_MEMBERS = 1000;                 // likewise for a room's member list
const REFRESH_DELAY_MS = 300;             // coalesce refreshes after a burst of member items
// Direct room names the server builds from two plain ids (else it uses a hash).
const DM_NAME_RE = /^dm\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)$/;
const EMOJI = ['👍', '❤️', '😂', '🎉', '😮', '👀'];  // the "+" picker
const ERROR_SHOW_MS = 5000;               // how long a refused edit / delete / react shows
const QUOTE_CHARS = 100;                  // a reply's quote: the start of the replied text (server rule)
const FLASH_MS = 1600;                    // how long a message jumped to from a quote is highlighted
const READ_EVERY_MS = 1000;               // at most one `read` frame a second
// Room list (new rooms, unread counts) refresh while the page is visible. No frame tells of a
// room other than the open one, so a room someone else starts shows up only when polled.
const ROOMS_EVERY_MS = 3000;
const RECEIPT_ROOM_MAX = 50;              // server default CHAT_RECEIPTS_MAX_MEMBERS: "seen by" up to this
const TYPING_EVERY_MS = 2500;             // at most one `typing` frame this often while the user types
const PRESENCE_LOOKUP_MS = 1500;          // users came online: one REST read (for names) this long after
const MAX_PRESENT = 1000;                 // the "who is here" list stops loading pages past this
const PRESENT_NAMES = 8;                  // names the "who is here" line shows; the rest are counted
const CHANGE_ERRORS = {
  forbidden: 'not allowed',
  not_found: 'no such message (or reaction)',
  already_deleted: 'that message was deleted',
  too_many_reactions: 'that message has too many different reactions',
  invalid_emoji: 'not an emoji',
};

const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'), statusText: $('status-text'), who: $('who'), whoName: $('who-name'),
  logout: $('logout'), loginView: $('login-view'), loginForm: $('login-form'), user: $('user'),
  pasteBox: $('paste-box'), tokenForm: $('token-form'), tokenInput: $('token-input'),
  loginError: $('login-error'), chatView: $('chat-view'), roomForm: $('room-form'), room: $('room'),
  roomError: $('room-error'), drop: $('drop'), rooms: $('rooms'), refreshRooms: $('refresh-rooms'),
  log: $('log'), messages: $('messages'), pending: $('pending'), empty: $('empty'),
  composer: $('composer'), input: $('input'), counter: $('counter'), send: $('send'),
  newRoomForm: $('new-room-form'), newName: $('new-name'),
  newKind: $('new-kind'), newTitle: $('new-title'), newMembers: $('new-members'),
  newRoomError: $('new-room-error'), directForm: $('direct-form'), directUser: $('direct-user'),
  directError: $('direct-error'), roomPanel: $('room-panel'), roomTitle: $('room-title'),
  roomKind: $('room-kind'), roomRole: $('room-role'), roomJoin: $('room-join'),
  roomLeave: $('room-leave'), roomDelete: $('room-delete'), roomHint: $('room-hint'),
  memberForm: $('member-form'), memberUser: $('member-user'), memberRole: $('member-role'),
  membersBox: $('members-box'), members: $('members'), panelMsg: $('room-panel-msg'),
  panelError: $('room-panel-error'), replyBar: $('reply-bar'), replyAuthor: $('reply-author'),
  replyQuote: $('reply-quote'), replyCancel: $('reply-cancel'), seen: $('seen'),
  presence: $('presence'), presenceText: $('presence-text'), typing: $('typing'),
};

// ---------------------------------------------------------------- state

// The login is the tab's (sessionStorage): it outlives a reload, and a second tab is someone
// else's (the demo's way to chat with yourself). What earlier pages left in localStorage goes.
const AUTH_KEYS = ['chat.token', 'chat.user', 'chat.expires_at', 'chat.renewable'];
for (const k of [...AUTH_KEYS, 'chat.room']) localStorage.removeItem(k);
const session = sessionStorage;

const auth = {
  token: session.getItem('chat.token') || '',
  user: session.getItem('chat.user') || '',   // '' when unknown (pasted opaque token)
  expiresAt: session.getItem('chat.expires_at') || '',
  // A dev login can be renewed by asking for a new dev token; a pasted token cannot.
  renewable: session.getItem('chat.renewable') === 'true',
  renewTimer: 0,
  name: '',            // the display name the server takes from the token (GET /auth/me), if any
};

const conn = {
  ws: null,
  token: '',           // the token this socket runs on (connected with, or sent in `auth`)
  room: null,          // the room we want to be in (null = none)
  gen: 0,              // bumped per socket, so events of an abandoned socket are ignored
  opened: false,       // this socket's handshake succeeded
  live: false,         // `ready` received on this socket
  everLive: false,     // some socket for this join reached `ready`
  resuming: false,     // this socket was opened with ?since=
  replayAnchor: null,  // last log item before this socket's replay
  attempt: 0,          // reconnect attempts since the last `ready`
  retryTimer: 0, countdownTimer: 0, pingTimer: 0,
  lastFrameAt: 0,
  expectClose: null,   // room we are leaving/deleting ourselves: its 4403 is no surprise
};

// The room shown in the panel. Outlives the socket (after a 4403 the panel still shows it).
const view = {
  room: null,
  info: null,          // GET /rooms/{room} object, or null when not (yet) known
  missing: false,      // GET /rooms/{room} said 404: never used, or not visible to us
  loadError: '',       // why the last GET /rooms/{room} failed (other than 404), as shown
};
let roomList = [];                  // last GET /rooms result, for re-rendering labels
const dmPeers = new Map();          // direct room name -> the other member (from its members)
const refresh = { timer: 0, list: false };

const lastSeq = new Map();  // room -> highest seq seen (dedupe + resume cursor)
const outbox = new Map();   // client_msg_id -> {id, body, reply, el, acked, failed, seq}
// room -> seq -> text message as shown: {seq, author, body, created_at, edited_at, deleted,
// reply_to: {seq, author, quote, deleted} | null, reactions: Map(emoji -> {count, me}), own, el,
// editing, draft, picker}.
const models = new Map();
const changes = new Map();  // client_msg_id -> {type, seq} of our edit / delete / react frames
let roomErrorTimer = 0;
let replying = null;        // the message the composer answers: {room, seq, author, quote}, or null
// Read cursors. `sent`: room -> highest seq the server has from us or another of our devices
// (a `read` goes out only when the shown seq passes it); `own`: room -> highest seq this page
// sent (the server's `read` frame comes back to this socket too). `marker`: the open room's
// cursor when it was opened, moved by other devices' reads: the "new messages" line goes after
// it. `unsupported`: the server answered a `read` with unknown_type (an older one): stop sending.
const reads = {
  sent: new Map(), own: new Map(), lastAt: 0, timer: 0, marker: null, unsupported: false,
};
const receipts = new Map();  // open room: user -> highest seq they read (small rooms' `receipt`)
// Who is in the open room. `ready` lists everyone present (up to 100; its `count` says how many
// in all), then `presence` frames say who came and went (ids only). `here`: the users present.
// `names`: user -> display name, or null when the token had none, for every user looked up (in
// `ready` or over REST; kept when they leave). `extra`: present but not listed (until the REST
// list is read). `journal`: frames that came while the REST list was read, applied on top of it.
// `known`: the server sent presence (an older one does not, nor does it know `typing`).
const presence = { here: new Set(), names: new Map(), extra: 0, journal: null, timer: 0, known: false };
// Who else is typing in the open room (the server's list), and when we last said we are.
const typing = { users: [], lastSent: 0 };
let memberList = null;      // the open room's members as last loaded (the panel marks who is here)

// ---------------------------------------------------------------- helpers

/** A UUID; crypto.randomUUID only exists in secure contexts (https, localhost). */
function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Length in code points, as the server (Python len) counts it. */
const charCount = (s) => [...s].length;

/** A readable reason from a failed fetch response ({"detail": str | [{loc, msg}]}). */
async function apiError(res) {
  try {
    const { detail } = await res.json();
    if (typeof detail === 'string') return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => {
        // FastAPI's loc starts with "body"/"query"/"path"; the field after it is what helps.
        const field = Array.isArray(d.loc) ? d.loc.slice(1).join('.') : '';
        return field ? `${field}: ${d.msg}` : d.msg;
      }).join('; ');
    }
  } catch { /* not JSON */ }
  return `HTTP ${res.status}`;
}

/**
 * A REST call with the page's bearer token. Never throws: resolves to
 * {ok, status, data, error} (status 0 = network error). A 401 logs out, as loadRooms always did.
 */
async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${auth.token}` } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch {
    return { ok: false, status: 0, data: null, error: 'network error' };
  }
  if (res.status === 401 && auth.token) {
    logout('Your token was rejected (expired?). Please log in again.');
  }
  if (!res.ok) return { ok: false, status: res.status, data: null, error: await apiError(res) };
  let data = null;
  if (res.status !== 204) { try { data = await res.json(); } catch { /* empty body */ } }
  return { ok: true, status: res.status, data, error: '' };
}

/** Every page of a `{[key]: [...], next_after}` list, up to `max` items. */
async function fetchAll(path, key, max) {
  const items = [];
  let after = null;
  for (;;) {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (after !== null) q.set('after', after);
    const r = await api('GET', `${path}?${q}`);
    if (!r.ok) return r;
    const page = Array.isArray(r.data?.[key]) ? r.data[key] : [];
    items.push(...page);
    const next = r.data?.next_after ?? null;
    // Stop on the last page, and on a cursor that does not move (never loop forever).
    if (next === null || next === after || page.length === 0 || items.length >= max) break;
    after = next;
  }
  return { ok: true, status: 200, items: items.slice(0, max), error: '' };
}

const roomPath = (room) => `/rooms/${encodeURIComponent(room)}`;
const memberPath = (room, user) => `${roomPath(room)}/members/${encodeURIComponent(user)}`;

/**
 * Answers can arrive out of order; only the newest request of each kind may render.
 * ticket('rooms') returns a function telling whether that request is still the newest.
 */
const tickets = new Map();
function ticket(kind) {
  const n = (tickets.get(kind) || 0) + 1;
  tickets.set(kind, n);
  return () => tickets.get(kind) === n;
}

/** Unverified peek into a JWT payload, only to show who we are and when it expires. */
function peekJwt(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch { return null; }
}

function formatTime(iso) {
  const d = new Date(iso);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleString([], { dateStyle: 'short', timeStyle: 'short' });
}

/** Build an element; children may be elements or strings (strings become text nodes). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
}

// ---------------------------------------------------------------- rendering

/** The log is scrolled to (near) its end. */
const atLogEnd = () => ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 60;
let logPinned = true;       // the user left the log at its end (as of the last scroll)

/** Run `fn` (which adds content) and keep the view pinned to the bottom if it was there. */
function withAutoScroll(fn) {
  const atBottom = atLogEnd();
  fn();
  ui.empty.hidden = true;
  if (atBottom) ui.log.scrollTop = ui.log.scrollHeight;
}

function messageItem({ author, body, created_at: createdAt, seq, reply }, own) {
  const time = createdAt
    ? h('time', { datetime: createdAt, title: new Date(createdAt).toLocaleString(), text: formatTime(createdAt) })
    : h('time', { text: '' });
  const li = h('li', { class: `msg ${own ? 'own' : 'other'}` },
    h('div', { class: 'meta' }, h('span', { class: 'author', text: author }), time,
      h('span', { class: 'state' })),
    ...(reply ? [quoteBlock(reply)] : []),
    h('div', { class: 'body', text: body }));
  if (seq) li.dataset.seq = seq;
  return li;
}

function roomModel(room) {
  if (!models.has(room)) models.set(room, new Map());
  return models.get(room);
}

/** A text item as the model keeps it (history gives `reactions`; live items and a resume don't). */
function modelMessage(m, own) {
  const reactions = new Map();
  for (const r of Array.isArray(m.reactions) ? m.reactions : []) {
    if (typeof r?.emoji === 'string' && r.count > 0) reactions.set(r.emoji, { count: r.count, me: Boolean(r.me) });
  }
  return {
    seq: m.seq, author: m.author, body: m.body ?? '', created_at: m.created_at,
    edited_at: m.edited_at ?? null, deleted: Boolean(m.deleted), reply_to: replyOf(m.reply_to),
    reactions, own, el: null, editing: false, draft: '', picker: false,
  };
}

/** A text item's `reply_to` as the page keeps it (a copy: live updates change it in place). */
function replyOf(r) {
  if (!r || typeof r !== 'object' || typeof r.seq !== 'number') return null;
  const deleted = Boolean(r.deleted) || typeof r.quote !== 'string';
  return { seq: r.seq, author: String(r.author ?? ''), quote: deleted ? null : r.quote, deleted };
}

/** What the server stores as a reply's quote: the first QUOTE_CHARS code points of the text. */
const quoteOf = (body) => [...body].slice(0, QUOTE_CHARS).join('');

/** Owners and admins of the open room may delete anyone's message. */
function canModerate() {
  return ['owner', 'admin'].includes(view.info?.role) && view.room === conn.room;
}

/** (Re)render a model message in place; an open editor is kept (with its focus and caret). */
function drawMessage(msg) {
  const quote = msg.deleted ? null : messageQuote(msg);
  const parts = [messageMeta(msg), ...(quote ? [quote] : []), messageBody(msg), messageReactions(msg)];
  if (!msg.el) msg.el = h('li', {}, ...parts);
  else if (msg.editing && msg.el.querySelector('.editor')) {
    // Everything around the editor (a quote cannot come or go while editing: only a delete does that).
    for (const part of parts) {
      const old = [...msg.el.children].find((c) => c.className === part.className);
      if (old && !old.classList.contains('editor')) old.replaceWith(part);
    }
  } else msg.el.replaceChildren(...parts);
  const mention = !msg.deleted && !msg.own && mentionsMe(msg.body);
  msg.el.className = `msg ${msg.own ? 'own' : 'other'}${msg.deleted ? ' deleted' : ''}${mention ? ' mention' : ''}`;
  msg.el.dataset.seq = msg.seq;
  return msg.el;
}

function redrawMessages() {
  for (const msg of models.get(conn.room)?.values() ?? []) drawMessage(msg);
}

function linkButton(text, onClick, label = '') {
  const b = h('button', { type: 'button', class: 'link', text });
  if (label) b.setAttribute('aria-label', label);
  b.addEventListener('click', onClick);
  return b;
}

function messageMeta(msg) {
  const time = msg.created_at
    ? h('time', { datetime: msg.created_at, title: new Date(msg.created_at).toLocaleString(), text: formatTime(msg.created_at) })
    : h('time', { text: '' });
  const meta = h('div', { class: 'meta' }, h('span', { class: 'author', text: msg.author }), time);
  if (msg.deleted) return meta;
  if (msg.edited_at) {
    meta.append(h('span', {
      class: 'edited', text: '(edited)', title: `edited ${new Date(msg.edited_at).toLocaleString()}`,
    }));
  }
  if (!msg.editing) meta.append(linkButton('reply', () => startReply(msg), `Reply to ${msg.author}`));
  if (msg.own && !msg.editing) meta.append(linkButton('edit', () => startEdit(msg)));
  if (msg.own || canModerate()) meta.append(linkButton('delete', () => confirmDelete(msg)));
  return meta;
}

function messageBody(msg) {
  if (msg.deleted) return h('div', { class: 'body tombstone', text: 'message deleted' });
  if (msg.editing) return messageEditor(msg);
  return h('div', { class: 'body' }, ...withMentions(msg.body));
}

/** The quote above a reply's body; a click goes to the replied message. */
function messageQuote(msg) {
  return msg.reply_to ? quoteBlock(msg.reply_to) : null;
}

function quoteBlock(reply) {
  const text = reply.deleted
    ? h('span', { class: 'quote-text tombstone', text: 'deleted message' })
    : h('span', { class: 'quote-text', text: reply.quote });
  const b = h('button', {
    type: 'button', class: 'quote', title: 'Show the replied message',
    'aria-label': `In reply to ${reply.author}${reply.deleted ? ' (deleted message)' : `: ${reply.quote}`}. Show it`,
  }, h('span', { class: 'author', text: reply.author }), text);
  b.addEventListener('click', () => goToMessage(reply.seq));
  return b;
}

/** Scroll to a message of the open room and highlight it briefly, if the page has it. */
function goToMessage(seq) {
  const msg = models.get(conn.room)?.get(seq);
  if (!msg?.el?.isConnected) {
    showRoomError('That message is older than what this page shows.');
    return;
  }
  msg.el.scrollIntoView({ block: 'center', behavior: 'smooth' });
  msg.el.classList.remove('flash');
  void msg.el.offsetWidth;  // restart the animation when clicked again
  msg.el.classList.add('flash');
  clearTimeout(msg.flashTimer);
  msg.flashTimer = setTimeout(() => msg.el?.classList.remove('flash'), FLASH_MS);
}

/**
 * `@id` mentions, by the server's rule (chat_mentions, migration 0007): an id of letters,
 * digits, `_ . -` not ending in `.` or `-` ("@bob." is bob), not inside a word or an address.
 */
const MENTION_RE = /(?<![A-Za-z0-9_.@-])@([A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9_])?)/g;

/** Where `body` mentions the signed-in user: [{at, end}] of each `@user`. */
function myMentions(body) {
  if (!auth.user || !body || !body.includes('@')) return [];
  return [...body.matchAll(MENTION_RE)]
    .filter((m) => m[1] === auth.user)
    .map((m) => ({ at: m.index, end: m.index + m[0].length }));
}

const mentionsMe = (body) => myMentions(body).length > 0;

/** The body as text nodes, with our own `@user` mentions in <mark>. */
function withMentions(body) {
  const out = [];
  let at = 0;
  for (const m of myMentions(body)) {
    out.push(body.slice(at, m.at), h('mark', { class: 'mention', text: body.slice(m.at, m.end) }));
    at = m.end;
  }
  out.push(body.slice(at));
  return out;
}

function messageEditor(msg) {
  const area = h('textarea', { rows: '2', 'aria-label': 'Edit message' });
  area.value = msg.draft;
  area.addEventListener('input', () => { msg.draft = area.value; });
  area.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); saveEdit(msg); }
    else if (ev.key === 'Escape') stopEdit(msg);
  });
  const save = h('button', { type: 'button', text: 'save' });
  save.addEventListener('click', () => saveEdit(msg));
  const cancel = h('button', { type: 'button', class: 'secondary', text: 'cancel' });
  cancel.addEventListener('click', () => stopEdit(msg));
  return h('div', { class: 'editor' }, area, h('div', { class: 'row' }, save, cancel));
}

/** Chips "👍 2" (highlighted when one is ours; a click toggles it), then "+" for the picker. */
function messageReactions(msg) {
  const row = h('div', { class: 'reactions' });
  if (msg.deleted) return row;
  for (const [emoji, r] of msg.reactions) {
    const chip = h('button', {
      type: 'button', class: `reaction${r.me ? ' me' : ''}`, 'aria-pressed': String(r.me),
      title: r.me ? 'take back your reaction' : `react with ${emoji}`,
    }, `${emoji} ${r.count}`);
    chip.addEventListener('click', () => react(msg, emoji, !r.me));
    row.append(chip);
  }
  const add = h('button', {
    type: 'button', class: 'reaction add', text: '+', title: 'add a reaction', 'aria-expanded': String(msg.picker),
  });
  add.addEventListener('click', () => { msg.picker = !msg.picker; drawMessage(msg); });
  row.append(add);
  if (msg.picker) {
    const picker = h('div', { class: 'picker' });
    for (const emoji of EMOJI) {
      const b = h('button', { type: 'button', class: 'reaction', text: emoji });
      b.addEventListener('click', () => {
        msg.picker = false;
        drawMessage(msg);
        if (!msg.reactions.get(emoji)?.me) react(msg, emoji, true);
      });
      picker.append(b);
    }
    row.append(picker);
  }
  return row;
}

function startEdit(msg) {
  Object.assign(msg, { editing: true, draft: msg.body });
  drawMessage(msg);
  const area = msg.el.querySelector('.editor textarea');
  area.focus();
  area.setSelectionRange(area.value.length, area.value.length);
}

/** Answer `msg`: the composer shows its quote until sent or cancelled. */
function startReply(msg) {
  replying = { room: conn.room, seq: msg.seq, author: msg.author, quote: quoteOf(msg.body) };
  renderReplyBar();
  ui.input.focus();
}

function cancelReply() {
  replying = null;
  renderReplyBar();
}

function renderReplyBar() {
  ui.replyBar.hidden = !replying;
  ui.replyAuthor.textContent = replying?.author ?? '';
  ui.replyQuote.textContent = replying?.quote ?? '';
  ui.input.setAttribute('aria-label', replying ? `Reply to ${replying.author}` : 'Message');
}

function stopEdit(msg) {
  Object.assign(msg, { editing: false, draft: '' });
  drawMessage(msg);
}

/** Send the edit; the text changes when its `edit` item comes back (to every tab alike). */
function saveEdit(msg) {
  const body = msg.draft;
  if (!body.trim()) { showRoomError('An edit cannot be empty: delete the message instead.'); return; }
  if (charCount(body) > MAX_CHARS) { showRoomError(`At most ${MAX_CHARS} characters.`); return; }
  if (body === msg.body) { stopEdit(msg); return; }
  if (sendChange({ type: 'edit', target_seq: msg.seq, body })) stopEdit(msg);
}

function confirmDelete(msg) {
  const whose = msg.own ? 'your message' : `${msg.author}'s message`;
  if (!window.confirm(`Delete ${whose}? This cannot be undone.`)) return;
  sendChange({ type: 'delete', target_seq: msg.seq });
}

function react(msg, emoji, on) {
  sendChange({ type: 'react', target_seq: msg.seq, emoji, on });
}

/** Send an edit / delete / react frame with an id, so its `error` can be told apart. */
function sendChange(frame) {
  if (!conn.live || conn.ws?.readyState !== WebSocket.OPEN) {
    showRoomError('Not connected: try again once live.');
    return false;
  }
  const id = newId();
  changes.set(id, { type: frame.type, seq: frame.target_seq });
  conn.ws.send(JSON.stringify({ ...frame, client_msg_id: id }));
  return true;
}

/** The room's error line, for a few seconds. */
function showRoomError(text) {
  ui.roomError.textContent = text;
  clearTimeout(roomErrorTimer);
  roomErrorTimer = setTimeout(() => {
    if (ui.roomError.textContent === text) ui.roomError.textContent = '';
  }, ERROR_SHOW_MS);
}

function addNote(text, kind = 'info') {
  withAutoScroll(() => ui.messages.append(h('li', { class: `note ${kind}`, text })));
}

/** Update the small state label of a pending bubble (queued / sending… / sent). */
function setBubbleState(entry, text, cls = '') {
  entry.el.querySelector('.state').textContent = text;
  entry.el.classList.toggle('failed', cls === 'failed');
  entry.el.classList.toggle('acked', cls === 'acked');
}

function clearView() {
  ui.messages.replaceChildren();
  ui.pending.replaceChildren();
  outbox.clear();
  models.clear();
  changes.clear();
  receipts.clear();
  reads.marker = null;
  cancelReply();
  renderSeen();
  resetPresence();
  clearTyping();
  ui.empty.hidden = false;
}

// ---------------------------------------------------------------- auth

function storeAuth(token, user, expiresAt, renewable) {
  Object.assign(auth, { token, user, expiresAt, renewable });
  session.setItem('chat.token', token);
  session.setItem('chat.user', user);
  session.setItem('chat.expires_at', expiresAt);
  session.setItem('chat.renewable', String(renewable));
}

function saveAuth(token, user, expiresAt, renewable) {
  storeAuth(token, user, expiresAt, renewable);
  showChat();
}

/** The token's own `exp` (ms), else the expiry the login answer gave; NaN when unknown. */
function tokenExpiry() {
  const exp = peekJwt(auth.token)?.exp;
  return typeof exp === 'number' ? exp * 1000 : Date.parse(auth.expiresAt);
}

/**
 * Renew a dev login before the server closes the socket at the token's `exp` (4401): at 80 % of
 * its remaining life, at least RENEW_MIN_LEAD_MS before `exp` when the life allows (never
 * sooner than half-way). A pasted token cannot be renewed: at `exp` the page asks to log in.
 */
function scheduleRenewal(delay) {
  clearTimeout(auth.renewTimer);
  auth.renewTimer = 0;
  if (!auth.renewable || !auth.token) return;
  if (delay === undefined) {
    const left = tokenExpiry() - Date.now();
    if (Number.isNaN(left)) return;
    delay = Math.max(left * 0.5, Math.min(left * 0.8, left - RENEW_MIN_LEAD_MS));
  }
  auth.renewTimer = setTimeout(renewToken, Math.min(Math.max(0, delay), 2 ** 31 - 1));
}

/** A fresh dev token for the same user; the open socket gets it as an `auth` frame. */
async function renewToken() {
  let res;
  try {
    res = await fetch('/auth/dev-token', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user: auth.user }),
    });
  } catch { res = null; }
  if (!auth.token) return false;  // logged out meanwhile
  if (!res || !res.ok) {
    if (tokenExpiry() - Date.now() > RENEW_RETRY_MS) scheduleRenewal(RENEW_RETRY_MS);
    addNote(`could not renew the token (${res ? await apiError(res) : 'network error'})`, 'warn');
    return false;
  }
  const data = await res.json();
  storeAuth(data.token, data.user, data.expires_at, true);
  scheduleRenewal();
  // A socket still in its handshake sends it once `ready` (it connected with the old one).
  if (conn.ws?.readyState === WebSocket.OPEN) sendToken();
  return true;
}

/** Move the open socket's deadline to the current token's `exp` (answered by `auth_ok`). */
function sendToken() {
  conn.token = auth.token;
  conn.ws.send(JSON.stringify({ type: 'auth', token: auth.token }));
}

function logout(reason = '') {
  leaveRoom();
  clearTimeout(auth.renewTimer);
  Object.assign(auth, { token: '', user: '', expiresAt: '', renewable: false, renewTimer: 0, name: '' });
  for (const k of AUTH_KEYS) session.removeItem(k);
  clearView();
  clearTimeout(refresh.timer);
  Object.assign(view, { room: null, info: null, missing: false, loadError: '' });
  roomList = [];
  dmPeers.clear();
  clearTimeout(reads.timer);
  Object.assign(reads, { lastAt: 0, timer: 0, marker: null, unsupported: false });
  reads.sent.clear();
  reads.own.clear();
  renderRoomPanel();
  ui.loginError.textContent = reason;
  ui.chatView.hidden = true;
  ui.who.hidden = true;
  ui.loginView.hidden = false;
  setStatus('idle', 'not connected');
  ui.user.focus();
}

async function requestDevToken(user) {
  ui.loginError.textContent = '';
  let res;
  try {
    res = await fetch('/auth/dev-token', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ user }),
    });
  } catch {
    ui.loginError.textContent = 'network error: is the server running?';
    return;
  }
  if (res.status === 404) {
    ui.loginError.textContent = 'Dev login is disabled on this server: paste a token instead.';
    ui.pasteBox.open = true;
    ui.tokenInput.focus();
    return;
  }
  if (!res.ok) { ui.loginError.textContent = await apiError(res); return; }
  const data = await res.json();
  saveAuth(data.token, data.user, data.expires_at, true);
}

function usePastedToken(raw) {
  const token = raw.trim().replace(/^Bearer\s+/i, '');
  const claims = peekJwt(token) || {};
  const expiresAt = claims.exp ? new Date(claims.exp * 1000).toISOString() : '';
  saveAuth(token, typeof claims.sub === 'string' ? claims.sub : '', expiresAt, false);
}

function showChat() {
  ui.loginView.hidden = true;
  ui.chatView.hidden = false;
  ui.who.hidden = false;
  renderWho();
  scheduleRenewal();
  loadRooms();
  loadMe();
  updateComposer();  // its height is measured only once the view shows
  // Back where we were: the room this user had open last (after a reload, or logging in again).
  const room = rememberedRoom();
  if (room) {
    ui.room.value = room;
    joinRoom(room);
  }
}

/** "signed in as Alice Liddell (alice)": the token's display name when it has one. */
function renderWho() {
  const { user, name } = auth;
  ui.whoName.textContent = !user ? 'signed in (token)'
    : name && name !== user ? `signed in as ${name} (${user})` : `signed in as ${user}`;
}

/**
 * GET /auth/me: who the server takes us to be. The user id of a pasted token is only guessed
 * from its `sub` (an identity provider may put it in another claim); the display name is shown.
 */
async function loadMe() {
  const token = auth.token;
  const r = await api('GET', '/auth/me');
  if (!r.ok || auth.token !== token || typeof r.data?.user !== 'string') return;
  auth.name = typeof r.data.name === 'string' ? r.data.name : '';
  if (r.data.user !== auth.user) {
    auth.user = r.data.user;
    session.setItem('chat.user', auth.user);
    renderRooms();         // direct rooms are labelled by the other member
    redrawMessages();      // which messages are ours
  }
  renderWho();
}

const ROOMS_KEY = 'chat.rooms';  // localStorage: user -> the room they had open last
const ROOMS_KEPT = 20;           // users remembered in one browser

function lastRooms() {
  try {
    const saved = JSON.parse(localStorage.getItem(ROOMS_KEY) || '{}');
    return saved && typeof saved === 'object' && !Array.isArray(saved) ? saved : {};
  } catch { return {}; }
}

/**
 * The room to reopen: the one this tab had open (a reload), else the one this user had open
 * last in this browser (a login, a new tab). Never another user's: it may be private to them.
 */
function rememberedRoom() {
  const tab = session.getItem('chat.room');
  const ours = tab !== null && session.getItem('chat.room.user') === auth.user;
  const room = ours ? tab : lastRooms()[auth.user];
  return typeof room === 'string' && NAME_RE.test(room) ? room : '';
}

function rememberRoom(room) {
  session.setItem('chat.room', room);
  session.setItem('chat.room.user', auth.user);
  const rooms = lastRooms();
  delete rooms[auth.user];  // moves to the end: the oldest entries go first
  rooms[auth.user] = room;
  const users = Object.keys(rooms);
  for (const user of users.slice(0, Math.max(0, users.length - ROOMS_KEPT))) delete rooms[user];
  localStorage.setItem(ROOMS_KEY, JSON.stringify(rooms));
}

/** A room we lost or left: reopening it would be refused. */
function forgetRoom(room) {
  if (session.getItem('chat.room') === room) session.removeItem('chat.room');
  const rooms = lastRooms();
  if (rooms[auth.user] === room) {
    delete rooms[auth.user];
    localStorage.setItem(ROOMS_KEY, JSON.stringify(rooms));
  }
}

/** GET /rooms (every page) -> clickable chips. Returns false on 401 (token rejected), else true/undefined. */
async function loadRooms() {
  const current = ticket('rooms');
  const r = await fetchAll('/rooms', 'rooms', MAX_ROOMS);
  if (!current()) return undefined;  // a newer load is under way
  if (r.status === 401) return false;  // api() logged out
  if (r.status === 0) {
    ui.rooms.replaceChildren(h('span', { class: 'muted', text: 'offline' }));
    return undefined;
  }
  if (!r.ok) {
    ui.rooms.replaceChildren(h('span', { class: 'muted', text: r.error }));
    return true;
  }
  roomList = r.items;
  renderRooms();
  return true;
}

function renderRooms() {
  // The list is rebuilt every few seconds: a chip that had the keyboard focus gets it back.
  const focused = ui.rooms.contains(document.activeElement) ? document.activeElement.dataset.room : undefined;
  const chips = roomList.map((r) => {
    const { unread, mentions } = unreadOf(r);
    const counts = unread ? ` · ${unread} unread${mentions ? `, ${mentions} mentioning you` : ''}` : '';
    const chip = h('button', {
      type: 'button', class: `chip${r.name === view.room ? ' active' : ''}`,
      title: `${r.name} · ${r.last_seq} messages${counts}`,
    }, roomLabel(r), kindBadge(r.kind), roleBadge(r), unreadBadge(unread, mentions));
    chip.dataset.room = r.name;
    chip.dataset.unread = unread;
    chip.addEventListener('click', () => { ui.room.value = r.name; joinRoom(r.name); });
    return chip;
  });
  ui.rooms.replaceChildren(...(chips.length ? chips : [h('span', { class: 'muted', text: 'none yet' })]));
  if (focused !== undefined) chips.find((c) => c.dataset.room === focused)?.focus();
}

/** What a room is called on the page: "@peer" for a direct room, else its title or #name. */
function roomLabel(r) {
  if (r.kind === 'direct') {
    const peer = dmPeer(r.name);
    return peer ? `@${peer}` : (r.title || r.name);
  }
  return r.title || `#${r.name}`;
}

/** The other member of a direct room: from its name when built from plain ids, else as learnt from its members. */
function dmPeer(name) {
  const m = DM_NAME_RE.exec(name);
  if (m && auth.user && (m[1] === auth.user || m[2] === auth.user)) {
    return m[1] === auth.user ? m[2] : m[1];
  }
  return dmPeers.get(name) || '';
}

function kindBadge(kind) {
  const badge = h('span', { class: 'badge', text: kind || '' });
  if (kind) badge.dataset.kind = kind;
  return badge;
}

/**
 * A room's unread counts as the list gave them; 0 for the open room (it is being read) and for
 * a room read to its end since the list was loaded (our `read` may not have been stored yet).
 */
function unreadOf(r) {
  if (typeof r.unread !== 'number' || r.name === conn.room) return { unread: 0, mentions: 0 };
  if ((reads.sent.get(r.name) ?? 0) >= r.last_seq) return { unread: 0, mentions: 0 };
  return { unread: r.unread, mentions: typeof r.mentions === 'number' ? r.mentions : 0 };
}

/** "3" or "3 · @1" (mentions highlighted); nothing when all is read. */
function unreadBadge(unread, mentions) {
  if (!unread) return '';
  return h('span', { class: `badge unread${mentions ? ' mentioned' : ''}` },
    h('span', { 'aria-hidden': 'true', text: mentions ? `${unread} · @${mentions}` : String(unread) }),
    h('span', { class: 'sr-only', text: `${unread} unread${mentions ? `, ${mentions} mentioning you` : ''}` }));
}

function roleBadge(r) {
  return h('span', { class: 'badge role', text: r.role || (r.kind ? 'not joined' : '') });
}

// ---------------------------------------------------------------- the open room

/** Show the open room's kind, our role and the actions that role allows. */
function renderRoomPanel() {
  const { room, info } = view;
  ui.roomPanel.hidden = !room;
  if (!room) return;
  const kind = info?.kind || '';
  const role = info?.role || null;
  const named = info || { name: room };
  ui.roomTitle.textContent = roomLabel(named);
  ui.roomTitle.title = room;
  ui.roomKind.textContent = kind;
  if (kind) ui.roomKind.dataset.kind = kind; else delete ui.roomKind.dataset.kind;
  ui.roomRole.textContent = info ? (role || 'not a member') : '';
  ui.roomKind.hidden = !kind;
  ui.roomRole.hidden = !info;
  // Membership changes need our own user id in the URL; a pasted opaque token has none.
  const me = Boolean(auth.user);
  const managed = Boolean(info) && kind !== 'direct';  // direct rooms: no member changes
  ui.roomJoin.hidden = !(managed && kind === 'public' && !role && me);
  ui.roomLeave.hidden = !(managed && role && me);
  ui.roomDelete.hidden = !(managed && role === 'owner');
  ui.memberForm.hidden = !(managed && (role === 'owner' || role === 'admin'));
  ui.membersBox.hidden = !info;
  ui.roomHint.hidden = !view.missing;
  ui.roomHint.textContent = view.missing
    ? 'No such room visible to you: if the name is new, the first message creates it (public).'
    : '';
  renderRooms();  // moves the "active" mark
}

function panelMessage(text, isError = false) {
  ui.panelMsg.textContent = isError ? '' : text;
  ui.panelError.textContent = isError ? text : '';
}

/** GET /rooms/{room} for the panel; also reloads the members list when it is open. */
async function refreshOpenRoom() {
  const room = view.room;
  if (!room) return;
  const current = ticket('room');
  const r = await api('GET', roomPath(room));
  if (!current() || view.room !== room) return;
  const role = view.info?.role ?? null;
  // A failed read's error ("network error" while offline) goes once a read succeeds; an
  // action's error (shown by panelMessage elsewhere) stays.
  if (view.loadError && ui.panelError.textContent === view.loadError) ui.panelError.textContent = '';
  view.loadError = '';
  if (r.ok) Object.assign(view, { info: r.data, missing: false });
  else if (r.status === 404) Object.assign(view, { info: null, missing: true });
  else if (r.status !== 401) {
    panelMessage(r.error, true);
    view.loadError = r.error;
  }
  renderRoomPanel();
  if ((view.info?.role ?? null) !== role) redrawMessages();  // who may delete changed
  if (ui.membersBox.open && !ui.membersBox.hidden) loadMembers();
}

/** GET /rooms/{room}/members (every page) into the members panel. */
async function loadMembers() {
  const room = view.room;
  if (!room) return;
  const current = ticket('members');
  const r = await fetchAll(`${roomPath(room)}/members`, 'members', MAX_MEMBERS);
  if (!current() || view.room !== room) return;
  if (!r.ok) {
    const text = r.status === 403 ? 'Join the room to see its members.' : r.error;
    ui.members.replaceChildren(h('li', { class: 'muted', text }));
    return;
  }
  memberList = r.items;
  renderMembers();
  learnDmPeer(room, r.items);
}

/** The members panel; a dot tells who is in the room now (while we are connected to it). */
function renderMembers() {
  if (!memberList) return;
  const live = presence.known && conn.live && conn.room === view.room;
  ui.members.replaceChildren(...memberList.map((m) => {
    const here = live && presence.here.has(m.user);
    const dot = live
      ? [h('span', { class: `presence-dot${here ? '' : ' away'}`, title: here ? 'here now' : 'not here' }),
        h('span', { class: 'sr-only', text: here ? 'here now:' : 'not here:' })]
      : [];
    const name = presence.names.get(m.user);
    return h('li', {}, ...dot,
      h('span', { text: m.user === auth.user ? `${m.user} (you)` : m.user }),
      ...(name && name !== m.user ? [h('span', { class: 'muted', text: name })] : []),
      h('span', { class: 'badge role', text: m.role }));
  }));
  if (!memberList.length) ui.members.append(h('li', { class: 'muted', text: 'no members' }));
}

/** A hashed direct room name says nothing: its member list tells who the other user is. */
function learnDmPeer(room, members) {
  if (view.info?.kind !== 'direct' || !auth.user || dmPeers.has(room)) return;
  // Only a room we are in: a service admin looking at someone else's pair has no "other".
  if (members.length !== 2 || !members.some((m) => m.user === auth.user)) return;
  const other = members.find((m) => m.user !== auth.user);
  if (!other) return;
  dmPeers.set(room, other.user);
  renderRoomPanel();
}

/**
 * Member items arrive in bursts (a new room adds everyone at once): refresh the panel once
 * after the burst, and the room list too when our own membership changed.
 */
function scheduleRoomRefresh(list) {
  refresh.list ||= list;
  clearTimeout(refresh.timer);
  refresh.timer = setTimeout(() => {
    if (refresh.list) loadRooms();
    refresh.list = false;
    refreshOpenRoom();
  }, REFRESH_DELAY_MS);
}

/** PUT ourselves as a member of a public room. */
async function joinMembership() {
  const room = view.room;
  const r = await api('PUT', memberPath(room, auth.user), { role: 'member' });
  if (!r.ok) { panelMessage(r.error, true); return; }
  panelMessage(`you joined #${room}`);
  // After a leave the socket is gone (closed 4403): open the room again.
  if (conn.room !== room) joinRoom(room); else refreshOpenRoom();
  loadRooms();
}

/** DELETE ourselves from the room; the server then closes our socket with 4403. */
async function leaveMembership() {
  const room = view.room;
  conn.expectClose = room;
  const r = await api('DELETE', memberPath(room, auth.user));
  if (!r.ok) {
    conn.expectClose = null;
    panelMessage(r.error, true);  // e.g. owner_must_hand_over
    return;
  }
  if (conn.room === room) leaveRoom();  // don't wait for the 4403, nor reconnect after it
  forgetRoom(room);
  addNote(`you left #${room}`);
  panelMessage(`you left #${room}`);
  refreshOpenRoom();
  loadRooms();
}

async function deleteRoom() {
  const room = view.room;
  if (!window.confirm(`Delete #${room} with all its messages and members?`)) return;
  conn.expectClose = room;
  const r = await api('DELETE', roomPath(room));
  if (!r.ok) {
    conn.expectClose = null;
    panelMessage(r.error, true);
    return;
  }
  if (conn.room === room) leaveRoom();
  forgetRoom(room);
  clearView();
  Object.assign(view, { room: null, info: null, missing: false, loadError: '' });
  renderRoomPanel();
  addNote(`deleted #${room}`);
  loadRooms();
}

/** PUT another user into the open room (or change their role). */
async function addMember(user, role) {
  const room = view.room;
  const r = await api('PUT', memberPath(room, user), { role });
  if (view.room !== room) return;
  if (!r.ok) { panelMessage(r.error, true); return; }
  ui.memberForm.reset();  // not just the value: an emptied required field would show as invalid
  panelMessage(r.status === 201 ? `added ${user} as ${role}` : `${user} is now ${r.data?.role || role}`);
  if (ui.membersBox.open) loadMembers();
}

/** POST /rooms from the "new room" form, then open the new room. */
async function createRoom() {
  ui.newRoomError.textContent = '';
  const body = { name: ui.newName.value.trim(), kind: ui.newKind.value };
  const title = ui.newTitle.value.trim();
  if (title) body.title = title;
  const members = ui.newMembers.value.split(',').map((m) => m.trim()).filter(Boolean);
  if (members.length) body.members = members;
  const r = await api('POST', '/rooms', body);
  if (!r.ok) { ui.newRoomError.textContent = r.error; return; }  // 409 name taken, 422 …
  ui.newRoomForm.reset();
  openCreated(r.data.name);
}

/** POST /rooms/direct (created or existing) and open it. */
async function openDirect(user) {
  ui.directError.textContent = '';
  const r = await api('POST', '/rooms/direct', { user });
  if (!r.ok) { ui.directError.textContent = r.error; return; }  // 422 with yourself
  ui.directForm.reset();  // not just the value: an emptied required field would show as invalid
  openCreated(r.data.name);
}

function openCreated(name) {
  ui.room.value = name;
  joinRoom(name);
  loadRooms();
}

// ---------------------------------------------------------------- connection

function clearTimers() {
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  clearInterval(conn.pingTimer);
}

/** Forget the current socket (its late events are ignored) and close it if still open. */
function abandonSocket(code, reason) {
  const ws = conn.ws;
  conn.gen += 1;
  conn.ws = null;
  conn.live = false;
  clearTimers();
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(code, reason);
  clearTyping();      // who types is told again after `ready` (and our own `typing` too)
  renderPresence();   // shown as stale until the next `ready`
}

function joinRoom(room) {
  ui.roomError.textContent = '';
  if (!NAME_RE.test(room)) {
    ui.roomError.textContent = 'Room names use letters, digits, _ . - (1 to 64 characters).';
    return;
  }
  flushRead();
  leaveRoom();
  rememberRoom(room);
  lastSeq.delete(room);  // the view is cleared, so start from recent history again
  clearView();
  Object.assign(conn, { room, everLive: false, attempt: 0, expectClose: null });
  ui.drop.disabled = false;
  showRoom(room);
  connect();
}

/** Point the panel at `room`: prefilled from the list, then GET /rooms/{room} for the truth. */
function showRoom(room) {
  const known = roomList.find((r) => r.name === room) || null;
  Object.assign(view, { room, info: known, missing: false, loadError: '' });
  panelMessage('');
  ui.membersBox.open = false;  // the old room's members must not show under the new name
  ui.members.replaceChildren();
  memberList = null;
  renderRoomPanel();
  refreshOpenRoom();
}

function leaveRoom() {
  abandonSocket(1000, 'leaving');
  conn.room = null;
  ui.drop.disabled = true;
  setStatus('idle', 'not connected');
}

function connect() {
  clearTimers();
  const room = conn.room;
  const gen = ++conn.gen;
  const since = lastSeq.get(room);
  // history: what a fresh join shows, and the fallback when a resume gap is too large.
  const params = new URLSearchParams({ token: auth.token, history: HISTORY });
  if (since !== undefined) params.set('since', since);
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}/ws/rooms/${encodeURIComponent(room)}?${params}`);
  Object.assign(conn, {
    ws, token: auth.token, opened: false, live: false, resuming: since !== undefined,
  });
  // Where this socket's replay starts in the log, so a "skipped" note can go before it.
  conn.replayAnchor = ui.messages.lastElementChild;
  setStatus('connecting', conn.attempt ? 'reconnecting…' : 'connecting…');

  ws.onopen = () => {
    if (gen !== conn.gen) return;
    conn.opened = true;
    conn.lastFrameAt = Date.now();
    conn.pingTimer = setInterval(keepAlive, PING_EVERY_MS);
  };
  ws.onmessage = (ev) => {
    if (gen !== conn.gen) return;
    conn.lastFrameAt = Date.now();
    let frame;
    try { frame = JSON.parse(ev.data); } catch { return; }
    handleFrame(frame);
  };
  // `error` is always followed by `close`, which does the work.
  ws.onclose = (ev) => { if (gen === conn.gen) handleClose(ev.code, ev.reason); };
}

/** Ping periodically; if nothing at all came back for a while the link is dead: reconnect. */
function keepAlive() {
  if (Date.now() - conn.lastFrameAt > STALE_AFTER_MS) {
    dropSocket(4000, 'stale');
  } else if (conn.ws?.readyState === WebSocket.OPEN) {
    conn.ws.send(JSON.stringify({ type: 'ping' }));
  }
}

/** Close the socket ourselves without waiting for the close handshake, then recover. */
function dropSocket(code, reason) {
  abandonSocket(code, reason);
  handleClose(code, reason);
}

/** The current socket ended (or was dropped): decide between giving up and reconnecting. */
function handleClose(code, reason) {
  const { opened } = conn;
  abandonSocket(1000, '');
  for (const e of outbox.values()) if (!e.acked && !e.failed) setBubbleState(e, 'queued');
  if (code === 4403) { accessLost(); return; }
  if (!opened && !conn.everLive) {
    // The first handshake of this join was refused (or the server is down): don't loop.
    // A private or direct room we are not in is refused the same way: the panel says so.
    setStatus('error', 'could not connect (check token / room name / access)');
    addNote('Could not connect (check token / room name, or you have no access).', 'error');
    ui.drop.disabled = true;
    refreshOpenRoom();
    return;
  }
  if (code === 1008) {
    setStatus('error', `not authorised${reason ? `: ${reason}` : ''}`);
    addNote('The server refused our token; log out and in again.', 'error');
    return;
  }
  if (code === 4401) {
    // The token reached its `exp` before a renewal took: renew now (a dev login), then resume.
    if (!auth.renewable) { logout('Your token expired. Please log in again.'); return; }
    addNote('token expired: renewing it', 'warn');
    setStatus('reconnecting', 'token expired — renewing it');
    const room = conn.room;
    renewToken().then((ok) => {
      if (!ok) logout('Your token expired and could not be renewed. Please log in again.');
      else if (conn.room === room && !conn.ws) scheduleReconnect('token renewed');
    });
    return;
  }
  scheduleReconnect(CLOSE_REASONS[code] || `disconnected (${code})`);
  // A refused re-handshake may mean the token expired meanwhile: ask the REST API, which
  // logs out (and so stops reconnecting) on 401. Or that we lost access while disconnected.
  if (!opened) { loadRooms(); checkAccess(conn.room); }
}

/**
 * 4403: we were removed or left, the room was deleted, or it became private. Reconnecting
 * would be refused, so stop (conn.room = null) and show what is left of the room.
 */
function accessLost() {
  const room = conn.room;
  const expected = conn.expectClose === room;  // our own leave/delete: already reported
  conn.expectClose = null;
  leaveRoom();
  forgetRoom(room);  // a reload would be refused: it opens no room instead
  for (const e of outbox.values()) if (!e.acked && !e.failed) setBubbleState(e, 'not sent', 'failed');
  if (!expected) {
    addNote('You no longer have access to this room', 'error');
    setStatus('error', `no access to #${room}`);
  }
  refreshOpenRoom();
  loadRooms();
}

/** A refused re-handshake to a room we could see: if it is now 404 to us, stop as on 4403. */
async function checkAccess(room) {
  if (!room || view.room !== room || !view.info) return;  // a never-used name is 404 anyway
  const r = await api('GET', roomPath(room));
  if (r.status === 404 && conn.room === room && !conn.live) accessLost();
}

/**
 * Reconnect after 0.5 s, 1 s, 2 s … capped at 10 s, each ±20 % jitter, with a countdown. While
 * the browser says it is offline, wait for it to come back online instead (the `online` event
 * connects at once; the slowest retry stays, should the browser be wrong).
 */
function scheduleReconnect(why) {
  clearTimers();
  if (navigator.onLine === false) {
    setStatus('reconnecting', `${why} — offline, reconnecting once back online`);
    conn.retryTimer = setTimeout(connect, BACKOFF_MAX_MS);
    return;
  }
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** conn.attempt);
  const delay = Math.min(BACKOFF_MAX_MS, base * (0.8 + Math.random() * 0.4));
  conn.attempt += 1;
  const due = Date.now() + delay;
  const tick = () => setStatus('reconnecting',
    `${why} — reconnecting in ${Math.max(0, Math.ceil((due - Date.now()) / 1000))}s`);
  tick();
  conn.countdownTimer = setInterval(tick, 250);
  conn.retryTimer = setTimeout(connect, delay);
}

// ---------------------------------------------------------------- frames

function handleFrame(f) {
  switch (f.type) {
    case 'message': onMessage(f); break;
    case 'ready': onReady(f); break;
    case 'ack': onAck(f); break;
    case 'error': onErrorFrame(f); break;
    case 'auth_ok': onAuthOk(f); break;
    case 'read': onReadFrame(f); break;
    case 'receipt': onReceipt(f); break;
    case 'presence': onPresence(f); break;
    case 'typing': onTyping(f); break;
    default: break; // pong and anything newer
  }
}

/** Every stream item advances the resume cursor, whatever its kind; only known kinds show. */
function onMessage(m) {
  if (m.room !== conn.room) return;
  if (m.seq <= (lastSeq.get(m.room) ?? 0)) return; // already shown
  lastSeq.set(m.room, m.seq);
  const kind = m.kind ?? 'text';  // servers before rooms-with-members send no kind
  if (kind === 'text') onTextMessage(m);
  else if (kind === 'member') onMemberItem(m);
  else if (kind === 'edit' || kind === 'delete' || kind === 'reaction') onChangeItem(m);
  // any other kind is newer than this page: skipped silently
  markRead();
}

function onTextMessage(m) {
  const mine = m.client_msg_id ? outbox.get(m.client_msg_id) : undefined;
  if (mine) {
    // Our own message came back: the confirmed copy replaces the pending bubble.
    mine.el.remove();
    outbox.delete(mine.id);
    if (!auth.user) { auth.user = m.author; session.setItem('chat.user', m.author); }
  }
  const own = Boolean(mine) || (auth.user !== '' && m.author === auth.user);
  if (typing.users.includes(m.author)) {
    typing.users = typing.users.filter((u) => u !== m.author);
    renderTyping();
  }
  const msg = modelMessage(m, own);
  roomModel(m.room).set(m.seq, msg);
  withAutoScroll(() => ui.messages.append(drawMessage(msg)));
  if (conn.live) {
    if (!own && !$('read-marker')) placeReadMarker();
    renderSeen();
  }
  // A never-used name (404) became a public room with its first message: show it as one.
  if (view.missing && view.room === m.room) scheduleRoomRefresh(true);
}

/** Apply an edit, delete or reaction (live or resumed) to the message it targets, in place. */
function onChangeItem(m) {
  if (m.kind === 'edit' || m.kind === 'delete') updateQuotes(m);
  const msg = models.get(m.room)?.get(m.target_seq);
  if (!msg) return;  // older than what the page shows
  if (m.kind === 'edit') {
    if (msg.deleted || typeof m.body !== 'string') return;  // null once the message is deleted
    Object.assign(msg, { body: m.body, edited_at: m.created_at });
  } else if (m.kind === 'delete') {
    Object.assign(msg, { deleted: true, body: '', reactions: new Map(), editing: false, draft: '', picker: false });
  } else {
    if (msg.deleted || typeof m.emoji !== 'string') return;
    applyReaction(msg, m.emoji, m.on !== false, auth.user !== '' && m.author === auth.user);
  }
  drawMessage(msg);
}

/**
 * The server rewrites the stored quotes of replies to an edited or deleted message; the page
 * does the same to what it shows: replies (also to a message older than the page), own replies
 * not yet confirmed, and the composer's.
 */
function updateQuotes(m) {
  const deleted = m.kind === 'delete';
  if (!deleted && typeof m.body !== 'string') return;  // an edit of a since deleted message
  const quote = deleted ? null : quoteOf(m.body);
  const applies = (r) => r && r.seq === m.target_seq && !r.deleted;
  for (const msg of models.get(m.room)?.values() ?? []) {
    if (!applies(msg.reply_to)) continue;
    Object.assign(msg.reply_to, { quote, deleted });
    if (!msg.deleted) drawMessage(msg);
  }
  if (m.room !== conn.room) return;
  for (const e of outbox.values()) {
    if (!applies(e.reply)) continue;
    Object.assign(e.reply, { quote, deleted });
    e.el.querySelector('.quote')?.replaceWith(quoteBlock(e.reply));
  }
  if (replying && replying.seq === m.target_seq) {
    if (deleted) {
      cancelReply();
      showRoomError('The message you were replying to was deleted.');
    } else {
      replying.quote = quote;
      renderReplyBar();
    }
  }
}

function applyReaction(msg, emoji, on, mine) {
  const r = msg.reactions.get(emoji) || { count: 0, me: false };
  r.count += on ? 1 : -1;
  if (mine) r.me = on;
  if (r.count > 0) msg.reactions.set(emoji, r); else msg.reactions.delete(emoji);
}

/** A membership change as a system line; then the panel (and maybe our role) is stale. */
function onMemberItem(m) {
  const text = memberText(m);
  if (!text) return;
  const li = h('li', { class: 'note member', text });
  if (m.created_at) li.title = new Date(m.created_at).toLocaleString();
  li.dataset.seq = m.seq;
  withAutoScroll(() => ui.messages.append(li));
  scheduleRoomRefresh(m.user === auth.user);
}

/** "alice added bob", "bob joined", "bob left", "alice removed bob", "alice made bob admin". */
function memberText({ author, user, action, role }) {
  if (typeof user !== 'string' || typeof author !== 'string') return '';
  switch (action) {
    case 'joined': return author === user ? `${user} joined` : `${author} added ${user}`;
    case 'left': return `${user} left`;
    case 'removed': return `${author} removed ${user}`;
    case 'role':
      if (!role) return '';
      // An owner hand-over also makes the previous owner admin, by their own doing.
      return author === user ? `${user} is now ${role}` : `${author} made ${user} ${role}`;
    default: return '';
  }
}

function onReady(r) {
  if (r.room !== conn.room) return;
  const seen = Math.max(lastSeq.get(r.room) ?? 0, r.last_seq);
  lastSeq.set(r.room, seen);
  if (conn.resuming && r.recovered === false) {
    const note = h('li', { class: 'note warn', text: 'some messages were skipped; showing the latest' });
    if (conn.replayAnchor?.isConnected) conn.replayAnchor.after(note);
    else ui.messages.prepend(note);
  }
  // Stored own messages whose copy fell into a skipped range will never arrive: drop them.
  for (const e of outbox.values()) {
    if (e.acked && e.seq <= seen) { e.el.remove(); outbox.delete(e.id); }
  }
  if (!conn.everLive) {
    addNote(`opened #${r.room}`);
    // Where we had read up to when we came in: the "new messages" line goes after it.
    // (The list may be a few seconds old: what this page read or heard of since counts too.)
    const known = knownCursor(r.room);
    const cursor = known === null ? null : Math.max(known, reads.sent.get(r.room) ?? 0);
    reads.marker = cursor;
    if (cursor !== null) reads.sent.set(r.room, cursor);
    loadRooms();
    loadReceipts(r.room);
  } else if (conn.resuming) addNote('reconnected', 'ok');
  Object.assign(conn, { live: true, everLive: true, attempt: 0 });
  clearTyping();
  setPresence(r.presence);
  placeReadMarker();
  renderSeen();
  markRead();
  setStatus('live', `live in #${r.room}`);
  if (conn.token !== auth.token) sendToken();  // renewed while this socket was connecting
  // Send whatever was typed while disconnected (same client_msg_id: the server dedupes).
  for (const e of outbox.values()) if (!e.acked && !e.failed) transmit(e);
}

function onAck(a) {
  if (changes.delete(a.client_msg_id)) return;  // its item shows the change
  const e = outbox.get(a.client_msg_id);
  if (!e) return; // the message frame came first and already replaced the bubble
  Object.assign(e, { acked: true, seq: a.seq });
  setBubbleState(e, 'sent', 'acked');
}

/** The socket now closes at the renewed token's `exp`. */
function onAuthOk(f) {
  if (typeof f.exp === 'number') {
    auth.expiresAt = new Date(f.exp * 1000).toISOString();
    session.setItem('chat.expires_at', auth.expiresAt);
  }
}

function onErrorFrame(f) {
  // Only our `read` frames go without an id and may be unknown: an older server. Stop sending them.
  if (f.code === 'unknown_type' && !f.client_msg_id && reads.lastAt) {
    reads.unsupported = true;
    return;
  }
  const change = f.client_msg_id ? changes.get(f.client_msg_id) : undefined;
  if (change) {
    changes.delete(f.client_msg_id);
    showRoomError(`${change.type} refused: ${CHANGE_ERRORS[f.code] || `${f.code}: ${f.detail}`}`);
    return;
  }
  const e = f.client_msg_id ? outbox.get(f.client_msg_id) : undefined;
  if (!e) { addNote(`${f.code}: ${f.detail}`, 'error'); return; }
  e.failed = true;
  setBubbleState(e, '', 'failed');
  const retry = RETRYABLE.has(f.code);
  const action = h('button', { type: 'button', class: 'link', text: retry ? 'retry' : 'dismiss' });
  action.addEventListener('click', () => {
    e.el.querySelector('.problem').remove();
    if (!retry) { e.el.remove(); outbox.delete(e.id); return; }
    e.failed = false;
    if (conn.live) transmit(e); else setBubbleState(e, 'queued');
  });
  e.el.append(h('div', { class: 'problem' }, `${f.code}: ${f.detail} `, action));
}

/**
 * Our read cursor moved: the server tells every socket of ours in the room, this one too. A
 * move past what this page sent is another device's: the open room's marker follows it.
 */
function onReadFrame(f) {
  if (typeof f.room !== 'string' || typeof f.seq !== 'number') return;
  reads.sent.set(f.room, Math.max(reads.sent.get(f.room) ?? 0, f.seq));
  const r = roomList.find((x) => x.name === f.room);
  if (r && typeof r.last_read_seq === 'number' && f.seq > r.last_read_seq) {
    r.last_read_seq = f.seq;
    renderRooms();
  }
  if (f.room !== conn.room || f.seq <= (reads.own.get(f.room) ?? 0)) return;
  reads.marker = Math.max(reads.marker ?? 0, f.seq);
  placeReadMarker();
}

/** A small room's member read up to `seq`: "seen by …" under the last message. */
function onReceipt(f) {
  if (f.room !== conn.room || typeof f.user !== 'string' || typeof f.seq !== 'number') return;
  if (f.user === auth.user) return;
  if (f.seq > (receipts.get(f.user) ?? 0)) receipts.set(f.user, f.seq);
  renderSeen();
}

/**
 * Where the others are when we come in: a small room's members and their cursors (receipts
 * only say who moved since). Rooms over RECEIPT_ROOM_MAX members get no receipts: skipped.
 */
async function loadReceipts(room) {
  if (!view.info?.role) return;  // only members see the members list (and get receipts)
  const r = await api('GET', `${roomPath(room)}/members?limit=${RECEIPT_ROOM_MAX}`);
  if (!r.ok || conn.room !== room || r.data?.next_after) return;
  for (const m of r.data?.members ?? []) {
    if (m.user === auth.user || typeof m.last_read_seq !== 'number') continue;
    if (m.last_read_seq > (receipts.get(m.user) ?? 0)) receipts.set(m.user, m.last_read_seq);
  }
  renderSeen();
}

/** Who (besides us) has read up to the open room's last text message. */
function renderSeen() {
  const shown = [...(models.get(conn.room)?.keys() ?? [])];
  const last = shown.length ? Math.max(...shown) : 0;
  const users = last ? [...receipts].filter(([, seq]) => seq >= last).map(([user]) => user).sort() : [];
  ui.seen.hidden = users.length === 0;
  ui.seen.textContent = users.length ? `seen by ${users.join(', ')}` : '';
}

/** The read cursor the room list (or the open room's info) gives for `room`, else null. */
function knownCursor(room) {
  const seqs = [roomList.find((r) => r.name === room)?.last_read_seq, view.room === room ? view.info?.last_read_seq : undefined]
    .filter((x) => typeof x === 'number');
  return seqs.length ? Math.max(...seqs) : null;
}

/** The "new messages" line before the first message by someone else after `reads.marker`. */
function placeReadMarker() {
  $('read-marker')?.remove();
  if (reads.marker === null) return;
  for (const msg of models.get(conn.room)?.values() ?? []) {
    if (msg.seq > reads.marker && !msg.own && !msg.deleted && msg.el?.isConnected) {
      msg.el.before(h('li', { id: 'read-marker', class: 'read-marker', role: 'separator', text: 'new messages' }));
      return;
    }
  }
}

/** The window is in front and the chat is on screen: what the log shows is being read. */
const attentive = () => document.visibilityState === 'visible' && document.hasFocus() && !ui.chatView.hidden;

/** The highest seq on screen in the log: the newest when scrolled to the bottom. */
function shownSeq() {
  const room = conn.room;
  const log = ui.log.getBoundingClientRect();
  if (ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 60) return lastSeq.get(room) ?? 0;
  for (let el = ui.messages.lastElementChild; el; el = el.previousElementSibling) {
    if (el.dataset.seq && el.getBoundingClientRect().top < log.bottom) return Number(el.dataset.seq);
  }
  return 0;
}

/**
 * Tell the server how far the user has read the open room: `{"type": "read", "seq"}` (no
 * answer), when the seq shown grows, at most once a second. The room's badge is 0 meanwhile.
 */
function markRead() {
  const room = conn.room;
  if (!room || !conn.live || reads.unsupported || !attentive()) return;
  const seq = shownSeq();
  if (seq <= (reads.sent.get(room) ?? 0)) return;
  const wait = reads.lastAt + READ_EVERY_MS - Date.now();
  if (wait > 0) {
    if (!reads.timer) reads.timer = setTimeout(() => { reads.timer = 0; markRead(); }, wait);
    return;
  }
  reads.lastAt = Date.now();
  reads.sent.set(room, seq);
  reads.own.set(room, seq);
  conn.ws.send(JSON.stringify({ type: 'read', seq }));
}

/**
 * Leaving a room with reading not yet sent (the throttle held it back): store it over REST,
 * which answers, so the room list loaded after it shows the room read.
 */
async function flushRead() {
  const room = conn.room;
  if (!room || !conn.live || reads.unsupported) return;
  const seq = shownSeq();
  if (seq <= (reads.sent.get(room) ?? 0)) return;
  reads.sent.set(room, seq);
  reads.own.set(room, seq);
  const r = await api('PUT', `${roomPath(room)}/read`, { seq });
  if (r.ok) loadRooms();
}

// ---------------------------------------------------------------- presence and typing

/** The name shown for a user: the display name their token carries, else their id. */
const displayName = (user) => presence.names.get(user) || user;

function resetPresence() {
  setPresence(null);
}

/** `ready`'s `presence` ({count, users: [{user, name}]}), or null: none (an older server, no room). */
function setPresence(p) {
  clearTimeout(presence.timer);
  ticket('presence');  // a REST read under way answers for a socket that is gone
  presence.here.clear();
  presence.names.clear();
  const known = Boolean(p) && Array.isArray(p.users);
  Object.assign(presence, { extra: 0, journal: null, timer: 0, known });
  if (known) {
    for (const u of p.users) {
      if (typeof u?.user !== 'string') continue;
      presence.here.add(u.user);
      presence.names.set(u.user, typeof u.name === 'string' ? u.name : null);
    }
    if (auth.user) presence.here.add(auth.user);  // listed unless past the cap: we are here
    const count = typeof p.count === 'number' ? p.count : 0;
    presence.extra = Math.max(0, count - presence.here.size);
    if (presence.extra) loadPresence(conn.room);  // the rest of the list
  }
  renderPresence();
}

/** `{"type": "presence", online, offline}`: who came and went since the last one. */
function onPresence(f) {
  if (f.room !== conn.room || !conn.live || !presence.known) return;
  presence.journal?.push(f);
  if (applyPresence(f)) schedulePresenceLookup();
  renderPresence();
}

/** Apply a `presence` frame (online, then offline); true when someone came whose name is unknown. */
function applyPresence(f) {
  let unnamed = false;
  for (const user of Array.isArray(f.online) ? f.online : []) {
    if (typeof user !== 'string') continue;
    presence.here.add(user);
    if (!presence.names.has(user)) unnamed = true;
  }
  for (const user of Array.isArray(f.offline) ? f.offline : []) {
    if (typeof user !== 'string' || user === auth.user) continue;  // we are here: this socket
    if (!presence.here.delete(user) && presence.extra) presence.extra -= 1;  // one not listed
    typing.users = typing.users.filter((u) => u !== user);  // gone: not typing any more
  }
  return unnamed;
}

/** Frames name users by id: read the list over REST a little later, once for all who came. */
function schedulePresenceLookup() {
  if (presence.timer) return;
  const room = conn.room;
  presence.timer = setTimeout(() => {
    presence.timer = 0;
    if (conn.room === room && conn.live) loadPresence(room);
  }, PRESENCE_LOOKUP_MS);
}

/** GET /rooms/{room}/presence (every page, up to MAX_PRESENT): who is here, with names. */
async function loadPresence(room) {
  const current = ticket('presence');
  presence.journal = [];
  const r = await fetchAll(`${roomPath(room)}/presence`, 'users', MAX_PRESENT);
  if (!current() || conn.room !== room || !conn.live) return;
  const journal = presence.journal ?? [];
  presence.journal = null;
  if (!r.ok) return;  // ids stay shown; the next arrival tries again
  const total = presence.here.size + presence.extra;
  presence.here.clear();
  for (const u of r.items) {
    if (typeof u?.user !== 'string') continue;
    presence.here.add(u.user);
    presence.names.set(u.user, typeof u.name === 'string' ? u.name : null);
  }
  if (auth.user) presence.here.add(auth.user);
  presence.extra = r.items.length >= MAX_PRESENT ? Math.max(0, total - presence.here.size) : 0;
  for (const f of journal) applyPresence(f);  // what changed while the list was read
  // Whoever is still unnamed came meanwhile or is past the list: not looked up again.
  for (const user of presence.here) if (!presence.names.has(user)) presence.names.set(user, null);
  renderPresence();
}

/** "3 here: Alice, bob, you"; dimmed while disconnected (it may be out of date). */
function renderPresence() {
  const shown = presence.known && Boolean(conn.room) && conn.room === view.room;
  ui.presence.hidden = !shown;
  if (shown) {
    const me = presence.here.has(auth.user);
    const others = [...presence.here].filter((u) => u !== auth.user).map(displayName)
      .sort((a, b) => a.localeCompare(b));
    const count = presence.here.size + presence.extra;
    const names = others.slice(0, PRESENT_NAMES);
    if (me) names.push('you');
    const rest = count - names.length;
    ui.presenceText.textContent = count === 1 && me
      ? 'only you here'
      : `${count} here: ${names.join(', ')}${rest > 0 ? ` and ${rest} more` : ''}`;
    ui.presence.title = conn.live ? others.join(', ') : 'not connected: this may be out of date';
    ui.presence.classList.toggle('stale', !conn.live);
  }
  if (ui.membersBox.open) renderMembers();
  renderTyping();  // names may have been learnt
}

function clearTyping() {
  typing.users = [];
  typing.lastSent = 0;
  renderTyping();
}

/** `{"type": "typing", users}`: everyone else typing in the room now ([] when nobody is). */
function onTyping(f) {
  if (f.room !== conn.room || !conn.live || !Array.isArray(f.users)) return;
  typing.users = f.users.filter((u) => typeof u === 'string' && u !== auth.user);
  renderTyping();
}

function renderTyping() {
  const names = typing.users.map(displayName);
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = 'several people are typing…';
  ui.typing.textContent = text;
}

// ---------------------------------------------------------------- sending

function transmit(e) {
  const frame = { type: 'send', body: e.body, client_msg_id: e.id };
  if (e.reply) frame.reply_to = e.reply.seq;
  conn.ws.send(JSON.stringify(frame));
  setBubbleState(e, 'sending…');
}

function submitMessage() {
  const body = ui.input.value;
  if (!body.trim() || charCount(body) > MAX_CHARS) return;
  if (!conn.room) { ui.roomError.textContent = 'Join a room first.'; return; }
  const id = newId();
  const reply = replying && replying.room === conn.room
    ? { seq: replying.seq, author: replying.author, quote: replying.quote, deleted: false }
    : null;
  const el = messageItem({ author: auth.user || 'me', body, reply }, true);
  el.classList.add('pending');
  const entry = { id, body, reply, el, acked: false, failed: false, seq: 0 };
  outbox.set(id, entry);
  withAutoScroll(() => ui.pending.append(el));
  ui.log.scrollTop = ui.log.scrollHeight;
  if (conn.live) transmit(entry); else setBubbleState(entry, 'queued');
  ui.input.value = '';
  typing.lastSent = 0;  // the message ended our typing: the next keystroke says so again
  cancelReply();
  updateComposer();
}

/** The user types in the message box: tell the room, at most every TYPING_EVERY_MS. */
function noteTyping() {
  if (!conn.live || !presence.known || conn.ws?.readyState !== WebSocket.OPEN) return;
  if (!ui.input.value.trim()) return;  // never for an empty box
  const now = Date.now();
  if (now - typing.lastSent < TYPING_EVERY_MS) return;
  typing.lastSent = now;
  conn.ws.send(JSON.stringify({ type: 'typing' }));
}

function updateComposer() {
  const n = charCount(ui.input.value);
  ui.counter.textContent = `${n} / ${MAX_CHARS}`;
  ui.counter.classList.toggle('near', n > MAX_CHARS * 0.9 && n <= MAX_CHARS);
  ui.counter.classList.toggle('over', n > MAX_CHARS);
  ui.send.disabled = !ui.input.value.trim() || n > MAX_CHARS;
  fitComposer();
}

/**
 * Grow the message box with its text (or its placeholder), up to CSS's max-height. A box not
 * laid out (the chat view hidden) measures 0: its height is left alone then, never set to 0,
 * and measured when it shows. `scrollHeight` leaves out the borders, which the border-box
 * height includes: without them the last line would be cut.
 */
function fitComposer() {
  const box = ui.input;
  if (!box.getClientRects().length) return;
  box.style.height = 'auto';
  const borders = box.offsetHeight - box.clientHeight;
  box.style.height = `${box.scrollHeight + borders}px`;
}

// ---------------------------------------------------------------- wiring

ui.loginForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const user = ui.user.value.trim();
  if (!NAME_RE.test(user)) {
    ui.loginError.textContent = 'User names use letters, digits, _ . - (1 to 64 characters).';
    return;
  }
  requestDevToken(user);
});
ui.tokenForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  if (ui.tokenInput.value.trim()) usePastedToken(ui.tokenInput.value);
  ui.tokenInput.value = '';
});
ui.logout.addEventListener('click', () => logout());
ui.roomForm.addEventListener('submit', (ev) => { ev.preventDefault(); joinRoom(ui.room.value.trim()); });
ui.refreshRooms.addEventListener('click', () => { loadRooms(); refreshOpenRoom(); });
ui.newRoomForm.addEventListener('submit', (ev) => { ev.preventDefault(); createRoom(); });
ui.directForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const user = ui.directUser.value.trim();
  if (user) openDirect(user);
});
ui.memberForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const user = ui.memberUser.value.trim();
  if (user) addMember(user, ui.memberRole.value);
});
ui.membersBox.addEventListener('toggle', () => { if (ui.membersBox.open) loadMembers(); });
ui.roomJoin.addEventListener('click', () => joinMembership());
ui.roomLeave.addEventListener('click', () => leaveMembership());
ui.roomDelete.addEventListener('click', () => deleteRoom());
ui.drop.addEventListener('click', () => {
  if (!conn.ws) return;
  addNote('simulated drop: socket closed by the page', 'warn');
  dropSocket(4001, 'simulated drop'); // handled like any unexpected drop: resume with since
});
ui.composer.addEventListener('submit', (ev) => { ev.preventDefault(); submitMessage(); });
ui.input.addEventListener('input', () => { updateComposer(); noteTyping(); });
// A narrower box wraps its text (and placeholder) onto more lines: measure again whenever its
// width changes (a window resize, a phone turned, the sidebar folding), not when only its
// height does, which is fitComposer's own doing.
let composerWidth = 0;
new ResizeObserver(([entry]) => {
  const width = entry.contentRect.width;
  if (width === composerWidth) return;
  composerWidth = width;
  fitComposer();
}).observe(ui.input);
ui.input.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    submitMessage();
  } else if (ev.key === 'Escape' && replying) {
    cancelReply();
  }
});
ui.replyCancel.addEventListener('click', () => { cancelReply(); ui.input.focus(); });
// Reading: the log scrolled, the window came to the front.
ui.log.addEventListener('scroll', () => { logPinned = atLogEnd(); markRead(); }, { passive: true });
// The log shrinks when what is above it grows (the open room's details arrive, the room list
// wraps onto another line; on a phone, most of the screen): scrolled to its end, it stays there.
new ResizeObserver(() => { if (logPinned) ui.log.scrollTop = ui.log.scrollHeight; }).observe(ui.log);
window.addEventListener('focus', () => markRead());
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState !== 'visible' || !auth.token || ui.chatView.hidden) return;
  markRead();
  loadRooms();
});
// Unread counts move while we look elsewhere: refresh the list while the page is visible.
setInterval(() => {
  if (auth.token && !ui.chatView.hidden && document.visibilityState === 'visible') loadRooms();
}, ROOMS_EVERY_MS);
// Back online while waiting out a backoff: try right away.
window.addEventListener('online', () => {
  if (conn.room && !conn.ws && conn.everLive) { conn.attempt = 0; connect(); }
  if (auth.token && !ui.chatView.hidden) { loadRooms(); refreshOpenRoom(); }
});
// Offline: a socket may linger for a long while before its TCP connection is found dead (the
// keep-alive notices after STALE_AFTER_MS). Drop it now and resume with `since` once online.
window.addEventListener('offline', () => {
  if (!conn.room || !conn.ws || !conn.everLive) return;
  addNote('offline: the network is gone', 'warn');
  dropSocket(4002, 'offline');
});

// Start: reuse a stored, unexpired token, else show the login form.
if (auth.token && !(auth.expiresAt && Date.parse(auth.expiresAt) <= Date.now())) {
  showChat();
} else {
  logout(auth.token ? 'Your session expired. Please log in again.' : '');
}
updateComposer();
