'use strict';
// Any node serves any client: the official CometD JavaScript client (long-polling) against two
// `bayeux serve --engine redis` nodes sharing one redis-server (started here, stopped by PID),
// through a per-request round-robin proxy, so that the client's requests (handshake, held
// connects, subscribe, unsubscribe, disconnect) alternate between the nodes. 50 messages,
// published alternately on each node by a client of that node, arrive exactly once and in
// order, without and with the CometD AckExtension.

const { before, after, describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { startServer } = require('../lib/server');
const { startRedis, startRoundRobinProxy } = require('../lib/cluster');
const { cometdAdapter, loadCometD } = require('../lib/clients');
const { Inbox, isDelivery, sleep, exitIfStuck } = require('../lib/util');

const TEST_TIMEOUT_MS = 40000;
const GRACE_MS = 500;
const N = 50;

let redis;
const nodes = [];
let proxy;

before(async () => {
  redis = await startRedis();
  const prefix = `interop-cluster-${process.pid}:`;
  for (let i = 0; i < 2; i++) {
    nodes.push(await startServer(['--engine', 'redis', '--redis-url', redis.url,
      '--redis-prefix', prefix]));
  }
  proxy = await startRoundRobinProxy(nodes.map((n) => n.url));
  await loadCometD();
});

after(async () => {
  if (proxy) await proxy.close();
  for (const n of nodes) await n.stop();
  if (redis) await redis.stop();
  exitIfStuck();
});

function defineClusterTest(withAck) {
  const label = withAck ? 'with the AckExtension' : 'without extensions';
  describe(`CometD JS over long-polling, requests alternating between two nodes, ${label}`, () => {
    it('subscribe, 50 messages published on both nodes arrive exactly once in order, ' +
      'unsubscribe, disconnect', { timeout: TEST_TIMEOUT_MS }, async () => {
      const adapter = cometdAdapter('long-polling');
      const lib = await loadCometD();
      const channel = `/interop/cluster/${withAck ? 'ack' : 'plain'}`;
      const path = new URL(nodes[0].url).pathname;
      const clients = [];
      let ok = false;
      try {
        const sub = await adapter.create(proxy.url(path), 'cluster-subscriber');
        clients.push(sub);
        if (withAck) {
          assert.equal(sub.cometd.registerExtension('ack', new lib.AckExtension()), true);
        }
        const firstRouted = proxy.routed.length;
        const hs = await sub.handshake();
        assert.equal(hs.successful, true);
        if (withAck) assert.equal(hs.ext && hs.ext.ack, true, `handshake ext ${JSON.stringify(hs.ext)}`);

        const listener = new Inbox('cluster listener');
        const handle = await sub.subscribe(channel, (ch, data) => listener.push(data));
        // A publisher on each node, straight to it.
        const pubs = [];
        for (const [i, node] of nodes.entries()) {
          const pub = await adapter.create(node.url, `cluster-publisher-${i}`);
          clients.push(pub);
          await pub.handshake();
          pubs.push(pub);
        }
        for (let i = 0; i < N; i++) {
          await pubs[i % pubs.length].publish(channel, { seq: i });
          // Let some connects come back with few messages, so that many requests carry them.
          if (i % 10 === 9) await sleep(100);
        }
        await pubs[N % pubs.length].publish(channel, { sentinel: true });
        await sub.wire.waitFor((m) => isDelivery(m) && m.data.sentinel === true,
          'sentinel after 50 messages', 15000);
        await sleep(GRACE_MS);

        const want = [...Array(N).keys(), 'end'];
        const label = (d) => (d.sentinel ? 'end' : d.seq);
        const wire = sub.wire.filter((m) => isDelivery(m) && m.channel === channel);
        assert.deepEqual(wire.map((m) => label(m.data)), want, 'deliveries on the wire, in order');
        assert.deepEqual(listener.items.map(label), want, 'listener calls, in order');

        // The subscriber's requests really alternated: connects went to both nodes.
        const mine = proxy.routed.slice(firstRouted);
        const connectsOn = (t) => mine.filter((r) => r.target === t &&
          r.channels.includes('/meta/connect')).length;
        assert.ok(connectsOn(0) >= 2 && connectsOn(1) >= 2,
          `connects per node: ${connectsOn(0)}, ${connectsOn(1)}`);

        // Unsubscribe (through the proxy, so on whichever node is next): the listener gets
        // nothing more. A connect held on the other node during the unsubscribe may still
        // carry messages on the wire (that node learns of the change at the client's next
        // request; docs/scaleout.md), so the wire is checked from two connects later on.
        const subs = listener.items.length;
        await sub.unsubscribe(handle);
        await pubs[0].publish(channel, { after: 1 });
        await pubs[1].publish(channel, { after: 1 });
        const mark = sub.wire.items.length;
        await sub.wire.waitForCount((m) => m.channel === '/meta/connect' &&
          sub.wire.items.indexOf(m) >= mark, 2, 'two connects after the unsubscribe', 10000);
        const fresh = sub.wire.items.length;
        await pubs[0].publish(channel, { after: 2 });
        await pubs[1].publish(channel, { after: 2 });
        await sleep(GRACE_MS + 500);
        assert.equal(listener.items.length, subs, 'a listener call after unsubscribe');
        assert.ok(!sub.wire.items.slice(fresh).some((m) => isDelivery(m) && m.data.after),
          'a delivery on the wire two connects after the unsubscribe');

        const bye = await sub.disconnect();
        assert.equal(bye.successful, true);
        clients.splice(clients.indexOf(sub), 1);
        // The session is gone on both nodes: at once on the node that took the disconnect; on
        // the other, whose copy that node took, after its next cursor commit (one a second at
        // least; docs/scaleout.md), which marks the copy stale so the next request finds the
        // record gone.
        await sleep(2500);
        for (const node of nodes) {
          const res = await fetch(node.url, {
            method: 'POST',
            headers: { 'Content-Type': 'application/json' },
            body: JSON.stringify([{ channel: '/meta/connect', clientId: hs.clientId,
              connectionType: 'long-polling', id: 'x' }]),
            signal: AbortSignal.timeout(5000),
          });
          const [reply] = await res.json();
          assert.equal(reply.successful, false, `connect after disconnect: ${JSON.stringify(reply)}`);
          assert.equal(reply.advice && reply.advice.reconnect, 'handshake');
        }
        for (const pub of pubs) {
          await pub.disconnect();
          clients.splice(clients.indexOf(pub), 1);
        }
        ok = true;
      } finally {
        if (!ok) {
          for (const n of nodes) process.stderr.write(`--- node stderr:\n${n.stderr().slice(-3000)}\n`);
        }
        await Promise.all(clients.map((c) => c.close()));
      }
    });
  });
}

defineClusterTest(false);
defineClusterTest(true);
