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
