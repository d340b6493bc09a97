// Delete for everyone through the library against a live gateway: the
// recipient's client gets the delete live, history shows the tombstone,
// and deleting someone else's message is refused with `forbidden`.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { ChatClient } from '../src/index.js';
import { Gateway, token, until, within } from './gateway.js';

test('a sender deletes its message for everyone; nobody else can', async () => {
  const gateway = await new Gateway().start();
  const clients = [];
  try {
    for (const user of ['alice', 'bob']) {
      clients.push(new ChatClient({ url: gateway.url, token: () => token(user, 'phone') }).start());
    }
    const [alice, bob] = clients;
    await within(Promise.all(clients.map((c) => c.opened())), 'both clients to open');
    const shown = [];
    bob.addEventListener('message', (e) => shown.push(e.detail));

    const sent = await within(alice.send({ to: 'bob', body: 'typo' }), '`sent`');
    await until(() => shown.length === 1, 'bob to get the message');
    await assert.rejects(
      within(bob.deleteForEveryone({ to: 'alice' }, sent.message_id), 'the refusal'),
      (error) => error.code === 'forbidden',
    );
    const deletion = await within(alice.deleteForEveryone({ to: 'bob' }, sent.message_id), 'the delete');
    await until(() => shown.length === 2, 'bob to get the delete');
    assert.equal(shown[1].deletes, sent.message_id);
    assert.equal(shown[1].message_id, deletion.message_id);
  } finally {
    for (const c of clients) c.close();
    await gateway.remove();
  }
});

test('a user deletes their account: every device closes with 4004 and stops', async () => {
  const gateway = await new Gateway().start();
  const clients = [];
  try {
    // A token function: the client could sign in anew, and still stops.
    for (const [user, device] of [['carol', 'phone'], ['carol', 'laptop'], ['dave', 'phone']]) {
      clients.push(new ChatClient({ url: gateway.url, token: () => token(user, device) }).start());
    }
    const [phone, laptop, dave] = clients;
    await within(Promise.all(clients.map((c) => c.opened())), 'the clients to open');
    const codes = [];
    laptop.addEventListener('close', (e) => codes.push(e.detail.code));
    const shown = [];
    dave.addEventListener('message', (e) => shown.push(e.detail));
    await within(phone.send({ to: 'dave', body: 'bye for now' }), '`sent`');
    await until(() => shown.length === 1, 'dave to get the message');

    const deleted = await within(phone.deleteAccount(), '`account_deleted`');
    assert.equal(deleted.type, 'account_deleted');
    assert.ok(deleted.rows > 0, JSON.stringify(deleted));
    await until(() => phone.state === 'closed' && laptop.state === 'closed', 'both devices to stop');
    assert.deepEqual(codes, [4004]);
    // Stopped for good: no reconnect after a back-off's worth of waiting.
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    assert.equal(laptop.state, 'closed');
    assert.deepEqual(codes, [4004]);

    // What carol sent stays in dave's history; her keys are gone.
    const page = await within(dave.history(shown[0].conversation), 'the history');
    assert.deepEqual(page.messages.map((m) => m.body), ['bye for now']);
    const devices = await within(dave.devices('carol'), 'the devices');
    assert.deepEqual(devices.devices, []);
  } finally {
    for (const c of clients) c.close();
    await gateway.remove();
  }
});
