'use strict';
// The CometD ack extension, end to end: the official CometD JavaScript client (cometd 9 +
// cometd-nodejs-client 2) with its AckExtension, over long-polling and over WebSocket, against
// `bayeux serve`. A client-side extension loses one whole /meta/connect response (its
// deliveries are dropped and its batch number hidden from the AckExtension, so the client
// never confirms that batch); the server must send that batch again, ahead of newer messages,
// and the application must see every message exactly once, in order.

const { before, after, describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { startServer } = require('../lib/server');
const { cometdAdapter, loadCometD } = require('../lib/clients');
const { Inbox, isDelivery, sleep, withTimeout, exitIfStuck } = require('../lib/util');

const TEST_TIMEOUT_MS = 30000;
const GRACE_MS = 300;
const CHANNEL = '/interop/ack';

/**
 * A CometD client extension that loses the next /meta/connect response carrying deliveries,
 * once armed: it returns null for those deliveries (the library never dispatches them) and
 * deletes `ext.ack` from the connect reply that closes the response, so the AckExtension
 * keeps its previous batch number and the next /meta/connect confirms only that.
 *
 * CometD JS applies incoming extensions in registration order (outgoing in reverse order),
 * so this one must be registered after the wire recorder and BEFORE the AckExtension. The
 * server puts a response's deliveries before its connect reply (as CometD does), and the
 * library processes one response's messages synchronously, so the deliveries dropped since
 * arming are exactly those of the response the next connect reply closes.
 */
class LoseOneResponse {
  /** `snapshot()` is called when the response is lost; its result is kept in `atLoss`. */
  constructor(snapshot = () => undefined) {
    this.snapshot = snapshot;
    this.atLoss = undefined;
    this.armed = false;
    this.pending = [];
    this.dropped = []; // the deliveries of the lost response
    this.hiddenBatch = undefined; // the ext.ack of its connect reply
    this.done = new Inbox('lost response');
  }

  arm() {
    this.armed = true;
  }

  incoming(message) {
    if (!this.armed) return message;
    if (isDelivery(message)) {
      this.pending.push(message);
      return null;
    }
    if (message.channel === '/meta/connect' && this.pending.length > 0) {
      this.hiddenBatch = message.ext ? message.ext.ack : undefined;
      if (message.ext) delete message.ext.ack;
      this.dropped = this.pending;
      this.pending = [];
      this.armed = false;
      this.atLoss = this.snapshot();
      this.done.push(message);
    }
    return message;
  }
}

let server;
before(async () => {
  server = await startServer();
  await loadCometD();
});
after(async () => {
  if (server) await server.stop();
  exitIfStuck();
});

function defineAckTest(transport) {
  describe(`CometD JS AckExtension over ${transport}`, () => {
    it('a lost connect response is redelivered: each message reaches the listener once, in order',
      { timeout: TEST_TIMEOUT_MS }, async () => {
        const adapter = cometdAdapter(transport);
        const lib = await loadCometD();
        const clients = [];
        let ok = false;
        try {
          const sub = await adapter.create(server.url, 'ack-subscriber');
          clients.push(sub);
          // Remembers how many messages the client had sent when the response was lost.
          const loser = new LoseOneResponse(() => sub.sent.length);
          // Order matters: 'interop-wire' (registered by the wrapper) sees every message as it
          // came off the wire, then the loser, then the AckExtension.
          assert.equal(sub.cometd.registerExtension('lose-one-response', loser), true);
          assert.equal(sub.cometd.registerExtension('ack', new lib.AckExtension()), true);

          const hs = await sub.handshake();
          assert.ok(sub.sent.some((m) => m.channel === '/meta/handshake' && m.ext && m.ext.ack === true),
            'the AckExtension did not ask for acks in the handshake');
          assert.equal(hs.ext && hs.ext.ack, true, `handshake reply ext: ${JSON.stringify(hs.ext)}`);

          const listener = new Inbox('ack listener');
          await sub.subscribe(CHANNEL, (channel, data) => listener.push(data.seq));
          const pub = await adapter.create(server.url, 'ack-publisher');
          clients.push(pub);
          await pub.handshake();

          const N = 30;
          const publishRange = async (from, to) => {
            for (let i = from; i < to; i++) await pub.publish(CHANNEL, { seq: i });
          };
          // Phase 1: normal delivery with acks.
          await publishRange(0, 10);
          await listener.waitForCount(() => true, 10, 'messages 0..9', 10000);
          // Phase 2: the next response with deliveries is lost on the client side.
          loser.arm();
          await publishRange(10, 20);
          await loser.done.waitFor(() => true, 'a connect response with deliveries to lose', 10000);
          await listener.waitForCount(() => true, 20, 'messages 0..19 (lost batch redelivered)', 10000);
          // Phase 3: later messages go on normally.
          await publishRange(20, N);
          await listener.waitForCount(() => true, N, `messages 0..${N - 1}`, 10000);
          await sleep(GRACE_MS);

          const all = [...Array(N).keys()];
          // The application: every message exactly once, in order.
          assert.deepEqual(listener.items, all, 'listener calls');

          // The lost response: some deliveries and the batch number of its connect reply.
          const dropped = loser.dropped.map((m) => m.data.seq);
          assert.ok(dropped.length > 0, 'no delivery was lost');
          assert.equal(typeof loser.hiddenBatch, 'number',
            `the lost connect reply had no numeric ext.ack (${JSON.stringify(loser.hiddenBatch)})`);
          const first = dropped[0];
          const last = dropped[dropped.length - 1];
          assert.deepEqual(dropped, all.slice(first, last + 1), 'the lost deliveries are consecutive');

          // The wire: the lost messages were really sent twice, the second time again as a
          // batch, ahead of anything newer (so: 0..last, then first..N-1).
          const wire = sub.wire.filter((m) => isDelivery(m) && m.channel === CHANNEL).map((m) => m.data.seq);
          const expectedWire = all.slice(0, last + 1).concat(all.slice(first));
          assert.deepEqual(wire, expectedWire, 'deliveries on the wire (lost batch redelivered first)');
          for (const seq of all) {
            const copies = wire.filter((s) => s === seq).length;
            assert.equal(copies, dropped.includes(seq) ? 2 : 1, `wire copies of message ${seq}`);
          }

          // The acks the client sent: never the hidden batch before the redelivery, and the
          // server's batches went on past it.
          const connectsOut = sub.sent.filter((m) => m.channel === '/meta/connect');
          const acksOut = connectsOut.map((m) => (m.ext ? m.ext.ack : undefined));
          assert.ok(acksOut.every((a) => typeof a === 'number'),
            `every /meta/connect carries a numeric ext.ack: ${JSON.stringify(acksOut)}`);
          const nextConnect = sub.sent.slice(loser.atLoss).find((m) => m.channel === '/meta/connect');
          assert.ok(nextConnect, 'no /meta/connect after the lost response');
          assert.ok(nextConnect.ext.ack < loser.hiddenBatch,
            `the connect after the lost response confirmed ${nextConnect.ext.ack}, ` +
            `not below the hidden batch ${loser.hiddenBatch}`);
          const connectRepliesIn = sub.wire.filter((m) => m.channel === '/meta/connect' && m.successful);
          const lostAt = connectRepliesIn.indexOf(loser.done.items[0]);
          assert.ok(lostAt >= 0, 'the lost connect reply is on the wire');
          const laterBatches = connectRepliesIn.slice(lostAt + 1)
            .map((m) => (m.ext ? m.ext.ack : undefined)).filter((b) => typeof b === 'number');
          assert.ok(laterBatches.some((b) => b > loser.hiddenBatch),
            `no connect reply after the loss carried a batch above ${loser.hiddenBatch}: ${JSON.stringify(laterBatches)}`);
          assert.ok(acksOut.some((a) => a >= loser.hiddenBatch),
            `the client never confirmed the redelivered batch: ${JSON.stringify(acksOut)}`);

          // The transport under test was really used, by both clients.
          for (const c of clients) {
            assert.equal(c.transportType(), transport, `${c.name}: library reports ${c.transportType()}`);
            const types = c.connectTypes();
            assert.ok(types.length > 0 && types.every((t) => t === transport),
              `${c.name}: /meta/connect connectionTypes ${JSON.stringify(types)}`);
          }
          for (const c of clients.splice(0)) {
            const bye = await withTimeout(c.disconnect(), 5000, `${c.name} disconnect`);
            assert.equal(bye.successful, true);
          }
          ok = true;
        } finally {
          if (!ok) await Promise.all(clients.map((c) => c.close()));
        }
      });
  });
}

defineAckTest('long-polling');
defineAckTest('websocket');
