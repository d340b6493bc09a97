// The browser client the node serves at `/`, in a real browser: headless
// Chromium (Debian's package) drives two pages signed in as two users and
// checks that a message, its delivered and read ticks, and a typing
// indication go across, then a second tab of the same user (another
// device) gets both sides of the conversation. Screenshots go to
// target/browser-test/.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import puppeteer from 'puppeteer-core';

import { Gateway } from './gateway.js';

const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const shots = resolve(dirname(fileURLToPath(import.meta.url)), '../../../target/browser-test');

async function signIn(browser, gateway, name) {
  // A fresh context per user: its own sessionStorage, so its own device.
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  await page.setViewport({ width: 1000, height: 640 });
  const problems = [];
  page.on('pageerror', (error) => problems.push(String(error)));
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(message.text());
  });
  await page.goto(gateway.http + '/');
  await page.waitForSelector('#dev-note:not([hidden])');
  await page.type('#signin-user', name);
  await page.click('#signin-button');
  await page.waitForFunction(() => document.getElementById('connection').textContent === 'open');
  return { page, problems, context };
}

async function openChat(page, peer) {
  await page.type('#new-chat-user', peer);
  await page.click('#new-chat-button');
  await page.waitForFunction((p) => document.getElementById('title').textContent === p, {}, peer);
}

const bodies = (page) =>
  page.$$eval('#messages .message .body', (nodes) => nodes.map((n) => n.textContent));

test('two users chat in two browser pages: message, ticks, typing, a second device', async () => {
  mkdirSync(shots, { recursive: true });
  const gateway = await new Gateway(['--dev-sign-in', 'true', '--presence-interval-ms', '500']).start();
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    const alice = await signIn(browser, gateway, 'alice');
    const bob = await signIn(browser, gateway, 'bob');
    await openChat(alice.page, 'bob');

    // Alice writes; bob sees it in his conversation list, then opens it.
    await alice.page.type('#composer-input', 'hello from alice');
    await alice.page.click('#composer-send');
    await bob.page.waitForSelector('#conversation-list li[data-conversation="dm:alice:bob"]');
    await bob.page.click('#conversation-list li[data-conversation="dm:alice:bob"]');
    await bob.page.waitForFunction(() =>
      [...document.querySelectorAll('#messages .message .body')].some((n) => n.textContent === 'hello from alice'));

    // Bob has it open, so it is read: alice's tick turns to read.
    await alice.page.waitForSelector('#messages .message.mine .ticks.read', { timeout: 10_000 });
    const tick = await alice.page.$eval('#messages .message.mine .ticks', (n) => [n.textContent, n.title]);
    assert.deepEqual(tick, ['✓✓', 'read']);

    // Bob types: alice sees it.
    await bob.page.type('#composer-input', 'hi al');
    await alice.page.waitForFunction(() => document.getElementById('typing').textContent === 'bob is typing…');
    await bob.page.type('#composer-input', 'ice');
    await bob.page.click('#composer-send');
    await alice.page.waitForFunction(() =>
      [...document.querySelectorAll('#messages .message .body')].some((n) => n.textContent === 'hi alice'));
    // Presence for the open conversation (they share one now).
    await alice.page.waitForFunction(() => document.getElementById('presence').textContent === 'online', { timeout: 20_000 });
    await alice.page.screenshot({ path: join(shots, 'alice.png') });
    await bob.page.screenshot({ path: join(shots, 'bob.png') });

    // A second tab of alice is a second device: its history shows both sides.
    const second = await signIn(browser, gateway, 'alice');
    await openChat(second.page, 'bob');
    await second.page.waitForFunction(() => document.querySelectorAll('#messages .message').length >= 2);
    assert.deepEqual((await bodies(second.page)).sort(), ['hello from alice', 'hi alice']);
    const devices = await Promise.all([alice, second].map((s) => s.page.$eval('#device', (n) => n.textContent)));
    assert.notEqual(devices[0], devices[1], 'two tabs, two devices');
    // A message from bob now reaches both of alice's devices live.
    await bob.page.type('#composer-input', 'to both tabs');
    await bob.page.click('#composer-send');
    for (const tab of [alice, second]) {
      await tab.page.waitForFunction(() =>
        [...document.querySelectorAll('#messages .message .body')].some((n) => n.textContent === 'to both tabs'));
    }
    await second.page.screenshot({ path: join(shots, 'alice-second-tab.png') });

    // Alice deletes her account from the second tab (confirming the
    // dialog): both of her tabs say so, and bob still reads what she sent.
    second.page.once('dialog', (dialog) => dialog.accept());
    await second.page.click('#delete-account');
    for (const tab of [alice, second]) {
      await tab.page.waitForFunction(() => document.getElementById('connection').textContent === 'this account was deleted');
    }
    const bobAgain = await signIn(browser, gateway, 'bob');
    await openChat(bobAgain.page, 'alice');
    await bobAgain.page.waitForFunction(() => document.querySelectorAll('#messages .message').length >= 3);
    assert.ok((await bodies(bobAgain.page)).includes('hello from alice'));
    for (const session of [alice, second, bobAgain]) assert.deepEqual(session.problems, [], 'no page errors');

    for (const session of [alice, bob, second]) assert.deepEqual(session.problems, [], 'no page errors');
  } finally {
    await browser.close();
    await gateway.remove();
  }
});
