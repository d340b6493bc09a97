// In a fleet (two gateways joined by a real nats-server), a client that
// lands on a node that is not its user's home is told so in `hello.home`
// and moves there by itself, at a random moment within its window.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { ChatClient } from '../src/index.js';
import { Gateway, freePort, token, until } from './gateway.js';

async function natsServer() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'chat-js-nats-'));
  const child = spawn('nats-server', ['-a', '127.0.0.1', '-p', String(port), '-js', '-sd', dir], { stdio: 'ignore' });
  return {
    url: `nats://127.0.0.1:${port}`,
    async stop() {
      const exited = new Promise((done) => child.once('exit', done));
      child.kill('SIGKILL');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function node(nats) {
  const gateway = new Gateway();
  gateway.port = await freePort();
  gateway.adminPort = await freePort();
  gateway.extra = [
    '--nats-url', nats.url,
    '--membership-heartbeat-ms', '200',
    '--public-url', `ws://127.0.0.1:${gateway.port}/ws`,
  ];
  return gateway.start();
}

test('a client away from its home node moves there on its own', async () => {
  const nats = await natsServer();
  const a = await node(nats);
  const b = await node(nats);
  try {
    for (const gateway of [a, b]) {
      await until(async () => (await gateway.metric('gateway_backplane_nodes_live')) === 2, 'both nodes to see each other');
    }
    const clients = [];
    for (let index = 0; index < 10; index += 1) {
      const user = `fh${index}`;
      const hellos = [];
      const c = new ChatClient({ url: a.url, token: () => token(user, 'phone'), followHomeWithinMs: 300, backoff: { baseMs: 20 } });
      c.addEventListener('open', (e) => hellos.push({ hello: e.detail, url: c.url }));
      c.start();
      clients.push({ c, hellos });
    }
    await until(() => clients.every(({ hellos }) => hellos.length >= 1), 'every client to connect');
    const away = clients.filter(({ hellos }) => hellos[0].hello.home);
    assert.ok(away.length >= 1 && away.length <= 9, `some users are homed on each node: ${away.length} of 10 away`);
    for (const { hellos } of away) assert.equal(hellos[0].hello.home, b.url, 'the home named is the other node');
    await until(() => away.every(({ hellos }) => hellos.length >= 2), 'every away client to move home', 10_000);
    for (const { hellos } of away) {
      assert.equal(hellos[1].url, b.url);
      assert.equal(hellos[1].hello.home, undefined, 'at home, hello names no other node');
    }
    for (const { c, hellos } of clients.filter((entry) => !away.includes(entry))) {
      assert.equal(hellos.length, 1, 'a client at home stays');
      assert.equal(c.url, a.url);
    }
    for (const { c } of clients) c.close();
  } finally {
    await a.remove();
    await b.remove();
    await nats.stop();
  }
});
