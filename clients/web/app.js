// The browser chat client the node serves at `/`: sign-in, conversations
// (one-to-one and groups), delivered and read ticks, typing, presence for
// the open conversation, history paging, and messages that arrive while
// away (the library's sync on reconnect). Each tab is its own device.
// Uses the client library (`/chat-client.js`) for everything on the wire.

import { ChatClient, CloseCode } from '/chat-client.js';

const $ = (id) => document.getElementById(id);
const TYPING_EVERY_MS = 3_000;
const PRESENCE_EVERY_MS = 15_000;

/** conversation id -> {id, title, peer?, group?, messages: Map, unread, oldest} */
const conversations = new Map();
let client = null;
let me = '';
let open = null;
let lastTyping = 0;
let typingTimer = null;
let presenceTimer = null;

/** A tab is a device: a device id kept for this tab's session. */
function deviceId() {
  let id = sessionStorage.getItem('chat-device');
  if (!id) {
    id = 'web-' + Math.random().toString(36).slice(2, 10);
    sessionStorage.setItem('chat-device', id);
  }
  return id;
}

const byId = (a, b) => (BigInt(a) < BigInt(b) ? -1 : BigInt(a) > BigInt(b) ? 1 : 0);

function conversationFor(id) {
  let conversation = conversations.get(id);
  if (!conversation) {
    let title = id;
    let peer;
    let group;
    if (id.startsWith('dm:')) {
      const [a, b] = id.slice(3).split(':');
      peer = a === me ? b : a;
      title = peer;
    } else if (id.startsWith('grp:')) {
      group = id.slice(4);
      title = 'group ' + group.slice(-6);
    }
    conversation = { id, title, peer, group, messages: new Map(), unread: 0, oldest: null, readUpTo: null, deliveredUpTo: null, historyLoaded: false };
    conversations.set(id, conversation);
  }
  return conversation;
}

function dmId(a, b) {
  return 'dm:' + [a, b].sort().join(':');
}

function renderList() {
  const list = $('conversation-list');
  list.replaceChildren();
  for (const conversation of conversations.values()) {
    const item = document.createElement('li');
    item.dataset.conversation = conversation.id;
    item.textContent = conversation.title;
    if (conversation === open) item.classList.add('open');
    if (conversation.unread > 0) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = String(conversation.unread);
      item.append(badge);
    }
    item.addEventListener('click', () => openConversation(conversation.id));
    list.append(item);
  }
}

function ticksFor(conversation, message) {
  if (message.from !== me) return null;
  const ticks = document.createElement('span');
  ticks.className = 'ticks';
  if (!message.message_id) {
    ticks.textContent = '…';
    ticks.title = 'sending';
  } else if (conversation.readUpTo && byId(message.message_id, conversation.readUpTo) <= 0) {
    ticks.textContent = '✓✓';
    ticks.classList.add('read');
    ticks.title = 'read';
  } else if (conversation.deliveredUpTo && byId(message.message_id, conversation.deliveredUpTo) <= 0) {
    ticks.textContent = '✓✓';
    ticks.title = 'delivered';
  } else {
    ticks.textContent = '✓';
    ticks.title = 'stored';
  }
  return ticks;
}

function renderMessages() {
  const list = $('messages');
  list.replaceChildren();
  if (!open) return;
  const sorted = [...open.messages.values()].sort((a, b) => {
    if (!a.message_id) return 1;
    if (!b.message_id) return -1;
    return byId(a.message_id, b.message_id);
  });
  for (const message of sorted) {
    const item = document.createElement('li');
    item.className = 'message' + (message.from === me ? ' mine' : '');
    if (message.message_id) item.dataset.id = message.message_id;
    item.dataset.from = message.from;
    if (open.group && message.from !== me) {
      const from = document.createElement('span');
      from.className = 'from';
      from.textContent = message.from;
      item.append(from);
    }
    const body = document.createElement('span');
    if (message.deleted) {
      body.className = 'event';
      body.textContent = 'This message was deleted';
    } else if (message.event) {
      body.className = 'event';
      body.textContent = `${message.from} ${message.event.action} ${message.event.members.join(', ')}`;
    } else {
      body.className = 'body';
      body.textContent = message.body;
    }
    item.append(body);
    const ticks = ticksFor(open, message);
    if (ticks) item.append(ticks);
    list.append(item);
  }
  list.scrollTop = list.scrollHeight;
}

function markRead(conversation) {
  if (conversation !== open || document.visibilityState !== 'visible') return;
  conversation.unread = 0;
  let newest = null;
  for (const message of conversation.messages.values()) {
    if (message.from !== me && message.message_id && (!newest || byId(message.message_id, newest.message_id) > 0)) newest = message;
  }
  if (newest && newest.message_id !== conversation.sentReadFor) {
    conversation.sentReadFor = newest.message_id;
    client.read(conversation.id, newest.message_id, newest.from);
  }
}

function addMessage(message) {
  const conversation = conversationFor(message.conversation);
  if (message.group && !conversation.group) conversation.group = message.group;
  if (message.deletes) {
    // Delete for everyone: the target shows as deleted; the notice itself is not a bubble.
    const target = conversation.messages.get(message.deletes);
    if (target) conversation.messages.set(message.deletes, { ...target, body: '', deleted: true });
    if (conversation === open) renderMessages();
    return;
  }
  conversation.messages.set(message.message_id, message);
  if (conversation !== open && message.from !== me) conversation.unread += 1;
  renderList();
  if (conversation === open) {
    renderMessages();
    markRead(conversation);
  }
}

async function loadHistory(conversation) {
  const page = await client.history(conversation.id, conversation.oldest ? { before: conversation.oldest, limit: 50 } : { limit: 50 });
  for (const message of page.messages) {
    if (message.deletes) continue;
    conversation.messages.set(message.message_id, message);
    if (!conversation.oldest || byId(message.message_id, conversation.oldest) < 0) conversation.oldest = message.message_id;
  }
  conversation.historyLoaded = true;
  $('older').hidden = page.messages.length < 50;
  if (conversation === open) renderMessages();
}

async function showPresence() {
  if (!open || !open.peer) {
    $('presence').textContent = '';
    return;
  }
  try {
    const answer = await client.presence([open.peer]);
    const entry = answer.users[0];
    if (!entry) return;
    $('presence').textContent = entry.online
      ? 'online'
      : entry.last_seen ? 'last seen ' + new Date(entry.last_seen).toLocaleString() : '';
  } catch {
    // Not told about strangers: nothing was said in this conversation yet.
    $('presence').textContent = '';
  }
}

function openConversation(id) {
  open = conversationFor(id);
  open.unread = 0;
  $('title').textContent = open.title;
  $('typing').textContent = '';
  $('composer-input').disabled = false;
  $('composer-send').disabled = false;
  renderList();
  renderMessages();
  if (!open.historyLoaded) loadHistory(open).then(() => markRead(open)).catch(() => {});
  else markRead(open);
  clearInterval(presenceTimer);
  showPresence();
  presenceTimer = setInterval(showPresence, PRESENCE_EVERY_MS);
  $('composer-input').focus();
}

async function send(text) {
  const conversation = open;
  const target = conversation.group ? { group: conversation.group } : { to: conversation.peer };
  const pending = { conversation: conversation.id, from: me, body: text, message_id: null };
  const key = 'pending-' + Math.random();
  conversation.messages.set(key, pending);
  renderMessages();
  try {
    const sent = await client.send({ ...target, body: text });
    conversation.messages.delete(key);
    conversation.messages.set(sent.message_id, { ...pending, message_id: sent.message_id, ts: sent.ts });
  } catch (error) {
    pending.body = `${text} (not sent: ${error.message})`;
  }
  if (conversation === open) renderMessages();
}

function onReceipts(frame) {
  const conversation = conversationFor(frame.conversation);
  for (const receipt of frame.receipts) {
    if (receipt.user === me) continue;
    const field = receipt.status === 'read' ? 'readUpTo' : 'deliveredUpTo';
    if (!conversation[field] || byId(receipt.up_to, conversation[field]) > 0) conversation[field] = receipt.up_to;
    if (receipt.status === 'read' && (!conversation.deliveredUpTo || byId(receipt.up_to, conversation.deliveredUpTo) > 0)) conversation.deliveredUpTo = receipt.up_to;
  }
  if (conversation === open) renderMessages();
}

function onTyping(frame) {
  if (!open || frame.conversation !== open.id || frame.from === me) return;
  $('typing').textContent = `${frame.from} is typing…`;
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => ($('typing').textContent = ''), frame.expires_ms ?? 5_000);
}

async function signIn(user, token) {
  me = user;
  const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  const device = deviceId();
  const getToken = token
    ? () => token
    : async () => {
        const answer = await fetch(`/dev/sign-in?user=${encodeURIComponent(user)}&device=${encodeURIComponent(device)}`);
        if (!answer.ok) throw new Error(await answer.text());
        return (await answer.json()).token;
      };
  client = new ChatClient({ url: wsUrl, token: getToken });
  client.addEventListener('state', (e) => ($('connection').textContent = e.detail));
  client.addEventListener('revoked', () => ($('connection').textContent = 'this device was revoked'));
  client.addEventListener('close', (e) => {
    if (e.detail.code === CloseCode.ACCOUNT_DELETED) $('connection').textContent = 'this account was deleted';
  });
  client.addEventListener('open', (e) => {
    me = e.detail.user;
    $('me').textContent = e.detail.user;
    $('device').textContent = e.detail.device;
  });
  client.addEventListener('message', (e) => addMessage(e.detail));
  client.addEventListener('receipts', (e) => onReceipts(e.detail));
  client.addEventListener('typing', (e) => onTyping(e.detail));
  // Messages older than the node's retention that this device never got.
  client.addEventListener('synced', (e) => {
    if (e.detail.expired > 0) {
      $('connection').textContent = `${e.detail.expired} older messages are no longer available`;
    }
  });
  $('signin').hidden = true;
  $('chat').hidden = false;
  client.start();
  await client.opened();
}

async function init() {
  // Without a name the sign-in says whether it is on (404 when off).
  const probe = await fetch('/dev/sign-in').catch(() => null);
  const dev = probe !== null && probe.ok;
  $('dev-note').hidden = !dev;
  $('token-note').hidden = dev;
  $('token-label').hidden = dev;
  $('signin-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const user = $('signin-user').value.trim();
    const token = dev ? null : $('signin-token').value.trim();
    signIn(user, token);
  });
  $('new-chat').addEventListener('submit', (event) => {
    event.preventDefault();
    const peer = $('new-chat-user').value.trim();
    $('new-chat-user').value = '';
    openConversation(dmId(me, peer));
  });
  $('new-group').addEventListener('submit', async (event) => {
    event.preventDefault();
    const members = $('new-group-members').value.split(',').map((m) => m.trim()).filter(Boolean);
    $('new-group-members').value = '';
    const sent = await client.createGroup(members);
    openConversation(sent.conversation);
  });
  $('older').addEventListener('click', () => open && loadHistory(open));
  $('delete-account').addEventListener('click', async () => {
    const really = window.confirm(
      `Delete the account ${me}? Every device is signed out, and your keys, groups and inbox are removed. What you sent stays with the people you sent it to.`,
    );
    if (!really) return;
    try {
      const deleted = await client.deleteAccount();
      $('connection').textContent = `account deleted (${deleted.rows} rows removed)`;
    } catch (error) {
      $('connection').textContent = `not deleted: ${error.message}`;
    }
  });
  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    const text = $('composer-input').value;
    if (!text || !open) return;
    $('composer-input').value = '';
    send(text);
  });
  $('composer-input').addEventListener('input', () => {
    const now = Date.now();
    if (!open || now - lastTyping < TYPING_EVERY_MS) return;
    lastTyping = now;
    client.typing(open.group ? { group: open.group } : { to: open.peer });
  });
  document.addEventListener('visibilitychange', () => open && markRead(open));
}

init();
