// Test helpers: a real gateway process (the workspace's binary) on free
// loopback ports, tokens signed like `gateway token` signs them, and
// bounded waits. Stops only the processes it started, by their pid.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const SECRET = 'js-client-tests-secret-0123456789abcdef';
const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const GATEWAY = process.env.GATEWAY_BIN ?? join(repo, 'target/debug/gateway');

export function freePort() {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

const base64url = (data) => Buffer.from(data).toString('base64url');

/** An HS256 token for `user`'s `device`, valid for an hour. */
export function token(user, device) {
  const header = base64url(JSON.stringify({ typ: 'JWT', alg: 'HS256' }));
  const claims = base64url(JSON.stringify({ sub: user, dev: device, exp: Math.floor(Date.now() / 1000) + 3600 }));
  const signature = createHmac('sha256', SECRET).update(`${header}.${claims}`).digest('base64url');
  return `${header}.${claims}.${signature}`;
}

export const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

/** Waits (bounded) until `check()` is true. */
export async function until(check, what, ms = 15_000) {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** `promise`, or an error naming `what` after `ms`: no test waits forever. */
export async function within(promise, what, ms = 30_000) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A gateway process. `start()` again after `kill9()` restarts it on the same
 * ports with the same data directory (its ring and store survive).
 */
export class Gateway {
  constructor(extra = []) {
    this.extra = extra;
    this.dir = mkdtempSync(join(tmpdir(), 'chat-js-'));
    this.child = null;
  }

  async start() {
    if (!this.port) {
      this.port = await freePort();
      this.adminPort = await freePort();
    }
    const args = [
      '--listen', `127.0.0.1:${this.port}`,
      '--admin-listen', `127.0.0.1:${this.adminPort}`,
      '--data-dir', this.dir,
      '--shards', '2',
      ...this.extra,
    ];
    this.child = spawn(GATEWAY, args, {
      env: { ...process.env, GATEWAY_AUTH_SECRET: SECRET, RUST_LOG: 'warn' },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const child = this.child;
    let exited = false;
    child.once('exit', () => (exited = true));
    await until(async () => {
      if (exited) throw new Error('the gateway exited during start-up');
      return (await this.admin('/readyz')) === 200;
    }, 'the gateway to be ready');
    return this;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  async admin(path) {
    try {
      const answer = await fetch(`http://127.0.0.1:${this.adminPort}${path}`);
      await answer.text();
      return answer.status;
    } catch {
      return 0;
    }
  }

  async metric(name) {
    const answer = await fetch(`http://127.0.0.1:${this.adminPort}/metrics`);
    const text = await answer.text();
    // Summed over labels (per-shard metrics have one line per shard).
    const lines = text.split('\n').filter((l) => l.startsWith(name + ' ') || l.startsWith(name + '{'));
    if (lines.length === 0) return NaN;
    return lines.reduce((sum, l) => sum + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
  }

  /** Sends `signal` and waits (bounded) for the process to exit. */
  async stop(signal = 'SIGKILL') {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((done) => child.once('exit', done));
    child.kill(signal);
    await Promise.race([exited, sleep(15_000)]);
  }

  kill9() {
    return this.stop('SIGKILL');
  }

  async remove() {
    await this.stop('SIGKILL');
    rmSync(this.dir, { recursive: true, force: true });
  }
}
