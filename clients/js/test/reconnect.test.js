// The library against a live gateway: a kill -9 and restart mid-conversation
// delivers every message to the application exactly once, and a drain
// (SIGTERM) with 200 clients has them reconnect spread over the window.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';

import { ChatClient, CloseCode, reconnectDelay } from '../src/index.js';
import { Gateway, freePort, token, until, sleep, within } from './gateway.js';

function client(gateway, user, device, options = {}) {
  return new ChatClient({
    url: gateway.url,
    token: () => token(user, device),
    backoff: { baseMs: 50, maxMs: 1_000, drainSpreadMs: 1_000 },
    ...options,
  }).start();
}

test('reconnect delays follow the close codes, with full jitter', () => {
  const backoff = { baseMs: 100, maxMs: 10_000, drainSpreadMs: 5_000, penaltyMs: 5_000 };
  assert.equal(reconnectDelay(CloseCode.HEARTBEAT, 0, backoff, () => 0.999), 99.9);
  assert.equal(reconnectDelay(1006, 3, backoff, () => 0.5), 400);
  assert.equal(reconnectDelay(1006, 30, backoff, () => 1), 10_000, 'bounded');
  assert.equal(reconnectDelay(CloseCode.RESTART, 9, backoff, () => 0.5), 2_500, 'a drain spreads over its window');
  assert.ok(reconnectDelay(CloseCode.SLOW_CONSUMER, 0, backoff, () => 0) >= 5_000, 'a slow consumer backs off');
  assert.ok(reconnectDelay(CloseCode.POLICY, 0, backoff, () => 0) >= 5_000);
  assert.equal(reconnectDelay(1006, 0, backoff, () => 0), 0, 'full jitter reaches zero');
});

test('a server that never answers the upgrade is dropped after connectTimeoutMs and tried again', { timeout: 30_000 }, async () => {
  // A real TCP listener that accepts and then says nothing, like a node
  // killed between accept and its answer.
  const held = [];
  const server = net.createServer((socket) => held.push(socket));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  const closes = [];
  const at = [];
  const silent = new ChatClient({
    url: `ws://127.0.0.1:${port}/ws`,
    token: 'unused',
    connectTimeoutMs: 300,
    backoff: { baseMs: 20, maxMs: 50 },
  });
  silent.addEventListener('close', (e) => {
    closes.push(e.detail);
    at.push(Date.now());
  });
  const started = Date.now();
  silent.start();
  try {
    // Timed by the client's own abandons (the TCP accepts can outnumber
    // the attempts: the runtime's WebSocket may open more than one socket).
    await until(() => closes.length >= 3, 'three abandoned attempts', 10_000);
    assert.ok(held.length >= 3, `the server saw every attempt, got ${held.length}`);
    // Each attempt waited connectTimeoutMs (less a timer's slack) after the
    // previous one's back-off of at most 50 ms.
    assert.ok(at[0] - started >= 290, `the first waited ${at[0] - started} ms`);
    for (let i = 1; i < at.length; i += 1) {
      assert.ok(at[i] - at[i - 1] >= 290, `attempt ${i + 1} waited ${at[i] - at[i - 1]} ms`);
    }
    for (const close of closes) assert.deepEqual(close, { code: CloseCode.ABNORMAL, reason: 'no hello within connectTimeoutMs' });
    assert.equal(silent.state === 'connecting' || silent.state === 'reconnecting', true, `still trying, state ${silent.state}`);
  } finally {
    silent.close();
    for (const socket of held) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  }
});

test('a kill -9 and restart mid-conversation delivers every message to the app exactly once', async () => {
  const gateway = await new Gateway().start();
  let alice;
  let bob;
  try {
    alice = client(gateway, 'alice', 'phone');
    bob = client(gateway, 'bob', 'laptop');
    await within(Promise.all([alice.opened(), bob.opened()]), 'both clients to open');
    const shown = [];
    bob.addEventListener('message', (e) => shown.push(e.detail));
    let reconnects = 0;
    alice.addEventListener('open', () => (reconnects += 1));

    const total = 200;
    const sends = [];
    for (let index = 0; index < total; index += 1) {
      if (index === 80) {
        // Mid-stream, with sends in flight: no goodbye, same ports and data.
        await gateway.kill9();
        await gateway.start();
      }
      sends.push(alice.send({ to: 'bob', body: `m${index}` }));
      await sleep(5);
    }
    const sent = await within(Promise.all(sends), 'every send to be answered `sent`', 60_000);
    assert.equal(sent.length, total, 'every send answered `sent`, some after a resend');
    await until(() => shown.length >= total, 'bob to see every message');
    await sleep(300);
    const bodies = shown.map((m) => m.body);
    assert.equal(new Set(bodies).size, total, 'no message shown twice');
    assert.equal(shown.length, total, 'nothing shown twice');
    assert.deepEqual([...bodies].sort(), Array.from({ length: total }, (_, i) => `m${i}`).sort());
    const ids = new Set(sent.map((s) => s.message_id));
    assert.equal(ids.size, total, 'one stored message per send');
    for (const message of shown) assert.ok(ids.has(message.message_id), `${message.body} under its acknowledged id`);
    assert.ok(reconnects >= 1, 'alice reconnected after the restart');
    assert.equal(alice.outbox.size, 0);
  } finally {
    // Closed on failure too: their reconnect timers would keep the test alive.
    alice?.close();
    bob?.close();
    await gateway.remove();
  }
});

test('a drain with 200 clients: they reconnect to the other process, spread over the window', async () => {
  // Two processes share the port (SO_REUSEPORT); the first drains.
  const draining = new Gateway(['--drain-window-ms', '2000', '--close-grace-ms', '500']);
  await draining.start();
  const staying = new Gateway();
  staying.port = draining.port;
  staying.adminPort = await freePort();
  await staying.start();
  const clients = [];
  try {
    const reopened = [];
    for (let index = 0; index < 200; index += 1) {
      const c = client(draining, `d${index}`, 'phone', { backoff: { baseMs: 50, maxMs: 1_000, drainSpreadMs: 1_000 } });
      clients.push(c);
    }
    await within(Promise.all(clients.map((c) => c.opened())), 'all 200 clients to open');
    const onFirst = await draining.metric('gateway_connections');
    assert.ok(onFirst > 0 && onFirst < 200, `the kernel spread the clients: ${onFirst} on the draining process`);
    let closed = 0;
    for (const c of clients) {
      c.addEventListener('close', (e) => {
        if (e.detail.code === CloseCode.RESTART) closed += 1;
      });
      c.addEventListener('open', () => reopened.push(Date.now()));
    }
    const drainStarted = Date.now();
    await draining.stop('SIGTERM');
    await until(() => reopened.length >= closed && closed === onFirst, 'every drained client to come back', 20_000);
    await until(async () => (await staying.metric('gateway_connections')) === 200, 'all 200 on the other process');
    assert.equal(closed, onFirst, 'each drained client was told 1012');
    // Spread: the drain closes over 2 s and each client waits up to 1 s more,
    // so the reconnects cover a good part of that, not one instant.
    const spread = Math.max(...reopened) - Math.min(...reopened);
    assert.ok(spread > 500, `reconnects spread over ${spread} ms`);
    assert.ok(Math.max(...reopened) - drainStarted < 10_000);
  } finally {
    for (const c of clients) c.close();
    await draining.remove();
    await staying.remove();
  }
});
