'use strict';
// The interop scenarios, written once and registered for each (client library, transport)
// adapter from lib/clients.js. Every wait is bounded (lib/util.js), so a broken server fails
// a test instead of hanging it.

const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { Inbox, isDelivery, sleep } = require('./util');

// After a sentinel message has arrived, wait this long for anything that should not come
// (a duplicate, or a message on a channel that does not match). Deliveries to one client are
// FIFO, so an unwanted message published before the sentinel would arrive before it; the
// grace period only catches a server that sends extra copies late.
const GRACE_MS = 300;
const TEST_TIMEOUT_MS = 30000;

/**
 * Registers the scenarios for `adapter`. `getUrl()` returns the server URL once the test
 * file's server is up (it is started in a before() hook).
 */
function defineInteropSuite(adapter, getUrl) {
  const expected = adapter.transport;

  describe(adapter.label, () => {
    let clients = [];

    async function newClient(role) {
      const c = await adapter.create(getUrl(), role);
      clients.push(c);
      return c;
    }

    async function connected(role) {
      const c = await newClient(role);
      const reply = await c.handshake();
      assert.equal(reply.successful, true, `${role}: handshake reply not successful`);
      return c;
    }

    /** Listener-side inbox of {channel, data} for one subscription. */
    function listenerInbox(name) {
      const inbox = new Inbox(name);
      const fn = (channel, data) => inbox.push({ channel, data });
      return { inbox, fn };
    }

    function assertTransport(c) {
      assert.equal(c.transportType(), expected, `${c.name}: library reports transport ${c.transportType()}`);
      const types = c.connectTypes();
      assert.ok(types.length > 0, `${c.name}: sent no /meta/connect`);
      assert.deepEqual(types, types.map(() => expected),
        `${c.name}: /meta/connect connectionTypes ${JSON.stringify(types)}`);
    }

    /** Disconnects every client of the test; asserts success when the test body succeeded. */
    async function finish(ok) {
      const all = clients;
      clients = [];
      try {
        if (ok) {
          for (const c of all) {
            assertTransport(c);
            const reply = await c.disconnect();
            assert.equal(reply.successful, true, `${c.name}: disconnect reply not successful`);
          }
        }
      } finally {
        // Whatever failed above, leave no client running (a no-op for disconnected ones).
        await Promise.all(all.map((c) => c.close()));
      }
    }

    /** Wraps a scenario: always tears down its clients; checks transport and disconnect. */
    function scenario(name, body) {
      it(name, { timeout: TEST_TIMEOUT_MS }, async () => {
        let ok = false;
        try {
          await body();
          ok = true;
        } finally {
          await finish(ok);
        }
      });
    }

    const deliveriesOn = (c, channel) =>
      c.wire.filter((m) => isDelivery(m) && m.channel === channel);

    scenario('handshake, subscribe and disconnect use the intended transport', async () => {
      const c = await newClient('basic');
      const reply = await c.handshake();
      assert.equal(reply.successful, true);
      assert.equal(typeof reply.clientId, 'string');
      assert.ok(reply.clientId.length > 0, 'empty clientId');
      assert.ok(Array.isArray(reply.supportedConnectionTypes) &&
        reply.supportedConnectionTypes.includes(expected),
        `server does not offer ${expected}: ${JSON.stringify(reply.supportedConnectionTypes)}`);

      const { inbox, fn } = listenerInbox('basic listener');
      await c.subscribe('/interop/basic', fn);
      // One round trip through the server proves the subscription is live.
      const pub = await connected('basic-publisher');
      await pub.publish('/interop/basic', { hello: 'world' });
      const got = await inbox.waitFor((m) => m.data && m.data.hello === 'world', 'delivery on /interop/basic');
      assert.equal(got.channel, '/interop/basic');

      // Disconnect explicitly here (finish() checks the transport and disconnects the others).
      assertTransport(c);
      const bye = await c.disconnect();
      assert.equal(bye.successful, true);
      clients = clients.filter((x) => x !== c);

      // The server really dropped the session: a connect with the old clientId is refused
      // with advice to handshake again (checked with a plain HTTP request).
      const res = await fetch(getUrl(), {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify([{ channel: '/meta/connect', clientId: reply.clientId,
          connectionType: 'long-polling', id: '1' }]),
        signal: AbortSignal.timeout(5000),
      });
      const [after] = await res.json();
      assert.equal(after.successful, false, `connect after disconnect: ${JSON.stringify(after)}`);
      assert.equal(after.advice && after.advice.reconnect, 'handshake');
    });

    scenario('50 messages from a second client arrive exactly once and in order', async () => {
      const N = 50;
      const sub = await connected('subscriber');
      const { inbox, fn } = listenerInbox('seq listener');
      await sub.subscribe('/interop/seq', fn);
      const pub = await connected('publisher');

      for (let i = 0; i < N; i++) {
        await pub.publish('/interop/seq', { seq: i });
      }
      await pub.publish('/interop/seq', { sentinel: true });
      await sub.wire.waitFor((m) => isDelivery(m) && m.data.sentinel === true,
        'sentinel after 50 messages', 10000);
      await sleep(GRACE_MS);

      const seen = deliveriesOn(sub, '/interop/seq').map((m) => m.data.sentinel ? 'end' : m.data.seq);
      const want = [...Array(N).keys(), 'end'];
      assert.deepEqual(seen, want, 'deliveries from the wire, in arrival order');
      assert.deepEqual(inbox.items.map((m) => m.data.sentinel ? 'end' : m.data.seq), want,
        'listener calls, in order');
      // The publisher is not subscribed: it must receive no delivery at all.
      assert.deepEqual(pub.wire.filter(isDelivery), []);
    });

    scenario('wildcards: /a/* matches one segment, /a/** any depth, neither matches /a', async () => {
      const star = await connected('star');
      const dstar = await connected('double-star');
      const starL = listenerInbox('/a/* listener');
      const dstarL = listenerInbox('/a/** listener');
      await star.subscribe('/a/*', starL.fn);
      await dstar.subscribe('/a/**', dstarL.fn);
      const pub = await connected('publisher');

      await pub.publish('/a/b/c', { n: 1 });
      await pub.publish('/a', { n: 2 });
      await pub.publish('/a/b', { n: 3 });
      await pub.publish('/a/b/c', { n: 4 });
      await pub.publish('/a', { n: 5 });
      await pub.publish('/a/b', { n: 6, last: true });
      await star.wire.waitFor((m) => isDelivery(m) && m.data.last, '/a/* gets /a/b (n=6)');
      await dstar.wire.waitFor((m) => isDelivery(m) && m.data.last, '/a/** gets /a/b (n=6)');
      await sleep(GRACE_MS);

      const summary = (c) => c.wire.filter(isDelivery).map((m) => `${m.channel}#${m.data.n}`);
      assert.deepEqual(summary(star), ['/a/b#3', '/a/b#6'], '/a/* subscriber (wire)');
      assert.deepEqual(summary(dstar), ['/a/b/c#1', '/a/b#3', '/a/b/c#4', '/a/b#6'], '/a/** subscriber (wire)');
      assert.deepEqual(starL.inbox.items.map((m) => m.data.n), [3, 6], '/a/* listener');
      assert.deepEqual(dstarL.inbox.items.map((m) => m.data.n), [1, 3, 4, 6], '/a/** listener');
    });

    scenario('a client subscribed by several matching patterns gets each message once', async () => {
      const sub = await connected('overlapping');
      const exact = listenerInbox('/w/x listener');
      const star = listenerInbox('/w/* listener');
      const dstar = listenerInbox('/w/** listener');
      await sub.subscribe('/w/x', exact.fn);
      await sub.subscribe('/w/*', star.fn);
      await sub.subscribe('/w/**', dstar.fn);
      const pub = await connected('publisher');

      // /w/x matches all three patterns, /w/y two of them, /w/y/z only /w/**.
      const plan = [];
      for (let i = 0; i < 5; i++) plan.push(['/w/x', i], ['/w/y', i], ['/w/y/z', i]);
      for (const [channel, i] of plan) {
        await pub.publish(channel, { id: `${channel}#${i}` });
      }
      await pub.publish('/w/x', { id: 'end' });
      await sub.wire.waitFor((m) => isDelivery(m) && m.data.id === 'end', 'sentinel on /w/x');
      await sleep(GRACE_MS);

      // What the server sent, counted at the wire (before the library's local fan-out).
      const ids = sub.wire.filter(isDelivery).map((m) => m.data.id);
      const want = plan.map(([channel, i]) => `${channel}#${i}`).concat('end');
      assert.deepEqual(ids, want, 'each message exactly once on the wire, in order');

      // Each local listener is called once per matching message.
      const of = (inbox) => inbox.items.map((m) => m.data.id);
      const pick = (re) => want.filter((id) => re.test(id));
      assert.deepEqual(of(exact.inbox), pick(/^\/w\/x#|^end$/), '/w/x listener');
      assert.deepEqual(of(star.inbox), pick(/^\/w\/[xy]#|^end$/), '/w/* listener');
      assert.deepEqual(of(dstar.inbox), want, '/w/** listener');
    });

    scenario('messages published across several held-connect timeouts arrive once, in order', async () => {
      // The server holds /meta/connect for 2 s (--connect-timeout-ms 2000): publishing for
      // ~4.5 s makes messages land while a connect is held, as it returns, and between two
      // connects, which must all be queued and delivered once.
      const sub = await connected('slow-subscriber');
      await sub.subscribe('/interop/slow', () => {});
      const pub = await connected('slow-publisher');
      const N = 18;
      for (let i = 0; i < N; i++) {
        await pub.publish('/interop/slow', { seq: i });
        await sleep(250);
      }
      await sub.wire.waitFor((m) => isDelivery(m) && m.data.seq === N - 1, `message ${N - 1}`);
      await sleep(GRACE_MS);
      assert.deepEqual(deliveriesOn(sub, '/interop/slow').map((m) => m.data.seq), [...Array(N).keys()]);
      const connects = sub.connectTypes().length;
      assert.ok(connects >= 3, `expected the subscriber to cycle /meta/connect, saw ${connects}`);
    });

    scenario('unsubscribe stops delivery', async () => {
      const sub = await connected('unsubscriber');
      const x = listenerInbox('/u/x listener');
      const control = listenerInbox('/u/control listener');
      const handle = await sub.subscribe('/u/x', x.fn);
      await sub.subscribe('/u/control', control.fn);
      const pub = await connected('publisher');

      await pub.publish('/u/x', { n: 1 });
      await sub.wire.waitFor((m) => isDelivery(m) && m.channel === '/u/x' && m.data.n === 1,
        'delivery before unsubscribe');

      await sub.unsubscribe(handle);
      await pub.publish('/u/x', { n: 2 });
      await pub.publish('/u/control', { n: 3 });
      await sub.wire.waitFor((m) => isDelivery(m) && m.channel === '/u/control',
        'control message after unsubscribe');
      await sleep(GRACE_MS);

      assert.deepEqual(deliveriesOn(sub, '/u/x').map((m) => m.data.n), [1],
        'no /u/x delivery after the unsubscribe was acknowledged (wire)');
      assert.deepEqual(x.inbox.items.map((m) => m.data.n), [1]);
      assert.deepEqual(control.inbox.items.map((m) => m.data.n), [3]);
    });
  });
}

/**
 * Against a server started with `--transports long-polling`: a client left with all its
 * transports (CometD registers websocket first; Faye probes a WebSocket upgrade even when the
 * server does not offer it) must settle on long-polling and work normally.
 */
function defineFallbackTest(adapter, getUrl) {
  it(`${adapter.label} settles on long-polling when the server offers only long-polling`,
    { timeout: TEST_TIMEOUT_MS }, async () => {
      const made = [];
      let ok = false;
      try {
        const sub = await adapter.create(getUrl(), 'fallback-subscriber');
        made.push(sub);
        const reply = await sub.handshake();
        assert.deepEqual(reply.supportedConnectionTypes, ['long-polling']);
        const { inbox, fn } = (() => {
          const box = new Inbox('fallback listener');
          return { inbox: box, fn: (channel, data) => box.push({ channel, data }) };
        })();
        await sub.subscribe('/interop/fallback', fn);
        const pub = await adapter.create(getUrl(), 'fallback-publisher');
        made.push(pub);
        await pub.handshake();
        for (let i = 0; i < 5; i++) await pub.publish('/interop/fallback', { seq: i });
        await inbox.waitForCount(() => true, 5, 'five deliveries');
        await sleep(GRACE_MS);
        assert.deepEqual(sub.wire.filter(isDelivery).map((m) => m.data.seq), [0, 1, 2, 3, 4]);
        for (const c of made) {
          assert.equal(c.transportType(), 'long-polling', `${c.name}: library reports ${c.transportType()}`);
          const types = c.connectTypes();
          assert.ok(types.length > 0 && types.every((t) => t === 'long-polling'),
            `${c.name}: /meta/connect connectionTypes ${JSON.stringify(types)}`);
        }
        for (const c of made.splice(0)) {
          const bye = await c.disconnect();
          assert.equal(bye.successful, true);
        }
        ok = true;
      } finally {
        if (!ok) await Promise.all(made.map((c) => c.close()));
      }
    });
}

module.exports = { defineInteropSuite, defineFallbackTest };
