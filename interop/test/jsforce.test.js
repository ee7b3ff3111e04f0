'use strict';
// jsforce 3.10.16 (a Salesforce client whose streaming is a Faye client) and a plain Faye
// client against the Salesforce emulator, `bayeux serve --salesforce`: OAuth password and
// SOAP login, platform events published through REST and received with their replay IDs,
// resuming from a replay ID, jsforce's AuthFailure extension on token revocation, and the
// silent stall of a Faye client that does not watch for `reconnect: none`.

const { before, after, describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { Inbox, sleep, withTimeout, exitIfStuck } = require('../lib/util');
const {
  DEMO, loadJsforce, startSalesforce, login, publishEvent, fault, FayeRecorder,
} = require('../lib/salesforce');
const { loadFaye } = require('../lib/clients');

const TEST_TIMEOUT_MS = 30000;
const GRACE_MS = 300;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
// How long a client that should have stopped is watched for any sign of life.
const SILENCE_MS = 5000;

after(() => exitIfStuck());

/** Publishes one Demo__e event through REST; returns its EventUuid (checked). */
async function publishDemo(base, token, fields) {
  const { status, body } = await publishEvent(base, token, fields);
  assert.equal(status, 201, `REST publish: HTTP ${status} ${JSON.stringify(body)}`);
  assert.equal(body.success, true, JSON.stringify(body));
  assert.equal(typeof body.id, 'string');
  assert.equal(body.errors.length, 1, JSON.stringify(body));
  assert.equal(body.errors[0].statusCode, 'OPERATION_ENQUEUED');
  assert.match(body.errors[0].message, UUID_RE);
  return body.errors[0].message;
}

/**
 * A jsforce streaming client (conn.streaming.createClient) with a recorder first, then the
 * Replay extension (when `replayId` is not undefined) and the AuthFailure extension.
 */
function jsforceClient(conn, name, { replayId = -1, onAuthFailure } = {}) {
  const { StreamingExtension } = loadJsforce();
  const recorder = new FayeRecorder(name);
  const authFailures = new Inbox(`${name} AuthFailure callbacks`);
  const extensions = [recorder.extension];
  if (replayId !== undefined) extensions.push(new StreamingExtension.Replay(DEMO.event, replayId));
  extensions.push(new StreamingExtension.AuthFailure((message) => {
    authFailures.push(message);
    if (onAuthFailure) onAuthFailure(message);
  }));
  const client = conn.streaming.createClient(extensions);
  recorder.watch(client);
  return { client, recorder, authFailures };
}

/** Subscribes `recorder`'s client to /event/Demo__e; returns the listener-side inbox. */
async function subscribeDemo(recorder) {
  const events = new Inbox(`${recorder.name} listener`);
  await recorder.subscribe(DEMO.event, (data) => events.push(data));
  return events;
}

describe('jsforce against the Salesforce emulator', () => {
  let server;
  const closers = [];
  before(async () => {
    server = await startSalesforce({ connectTimeout: 2 });
  });
  after(async () => {
    for (const c of closers.splice(0)) await c.close();
    if (server) await server.stop();
  });

  it('logs in with the OAuth password flow through loginUrl', { timeout: TEST_TIMEOUT_MS }, async () => {
    const { conn, userInfo } = await login(server.base);
    assert.equal(userInfo.id, DEMO.userId);
    assert.equal(userInfo.organizationId, DEMO.orgId);
    assert.equal(conn.instanceUrl, server.base);
    assert.equal(typeof conn.accessToken, 'string');
    assert.ok(conn.accessToken.startsWith(DEMO.orgId.slice(0, 15)), `token ${conn.accessToken}`);
    // The token works for REST.
    await publishDemo(server.base, conn.accessToken, { Message__c: 'oauth' });
    // A wrong password is refused as Salesforce does (invalid_grant).
    await assert.rejects(login(server.base, { password: 'wrong' }),
      (e) => e.name === 'invalid_grant' && /authentication failure/.test(e.message));
  });

  it('logs in with the SOAP login when no connected app is given', { timeout: TEST_TIMEOUT_MS }, async () => {
    const { conn, userInfo } = await login(server.base, { soap: true });
    assert.equal(userInfo.id, DEMO.userId);
    assert.equal(userInfo.organizationId, DEMO.orgId);
    assert.equal(conn.instanceUrl, server.base);
    assert.equal(typeof conn.accessToken, 'string');
    await publishDemo(server.base, conn.accessToken, { Message__c: 'soap' });
    await assert.rejects(login(server.base, { soap: true, password: 'wrong' }),
      (e) => /INVALID_LOGIN/.test(`${e.name} ${e.message}`));
  });

  it('streams platform events published through REST, with replayId and EventUuid',
    { timeout: TEST_TIMEOUT_MS }, async () => {
      const { conn } = await login(server.base);
      const s = jsforceClient(conn, 'jsforce-stream');
      closers.push(s.recorder);
      const events = await subscribeDemo(s.recorder);

      // The handshake went to {instance_url}/cometd/<version> with `OAuth <token>`, and the
      // server enabled replay; the subscribe carried the replay map.
      const hs = s.recorder.wire.items.find((m) => m.channel === '/meta/handshake');
      assert.equal(hs.successful, true, JSON.stringify(hs));
      assert.equal(hs.ext && hs.ext.replay, true, `handshake ext ${JSON.stringify(hs.ext)}`);
      assert.equal(s.client._dispatcher.endpoint.href, `${server.base}/cometd/${conn.version}`);
      const subOut = s.recorder.sent.items.find((m) => m.channel === '/meta/subscribe');
      assert.deepEqual(subOut.ext, { replay: { [DEMO.event]: -1 } });

      const uuids = [];
      for (let i = 0; i < 3; i++) {
        uuids.push(await publishDemo(conn.instanceUrl, conn.accessToken, { Message__c: `m${i}`, Seq__c: i }));
      }
      await events.waitForCount(() => true, 3, 'three platform events', 10000);
      await sleep(GRACE_MS);
      assert.equal(events.items.length, 3, 'each event once');
      events.items.forEach((data, i) => {
        assert.equal(data.event.EventUuid, uuids[i], `event ${i}: EventUuid matches the REST reply`);
        assert.equal(typeof data.event.replayId, 'number', `event ${i}: replayId`);
        assert.equal(data.payload.Message__c, `m${i}`);
        assert.equal(data.payload.Seq__c, i);
        assert.equal(data.payload.CreatedById, DEMO.userId);
        assert.ok(!Number.isNaN(Date.parse(data.payload.CreatedDate)), `CreatedDate ${data.payload.CreatedDate}`);
        assert.equal(typeof data.schema, 'string');
      });
      const ids = events.items.map((d) => d.event.replayId);
      assert.ok(ids.every((id, i) => i === 0 || id > ids[i - 1]), `replay IDs increase: ${ids}`);
      assert.equal(s.authFailures.items.length, 0);
      assert.deepEqual(s.recorder.events.filter((e) => e.type === 'transport:down'), []);
      await s.recorder.close();
    });

  it('a new client resumes after a replay ID: only later events', { timeout: TEST_TIMEOUT_MS }, async () => {
    const { conn } = await login(server.base);
    // Learn the replay IDs of four events from a live subscriber.
    const live = jsforceClient(conn, 'jsforce-live');
    closers.push(live.recorder);
    const liveEvents = await subscribeDemo(live.recorder);
    const uuids = [];
    for (let i = 0; i < 4; i++) {
      uuids.push(await publishDemo(server.base, conn.accessToken, { Message__c: `r${i}` }));
    }
    await liveEvents.waitForCount(() => true, 4, 'four events (live subscriber)', 10000);
    const live4 = liveEvents.items.slice(-4);
    assert.deepEqual(live4.map((d) => d.event.EventUuid), uuids);
    await live.recorder.close();

    // Resume after the second one: the third and fourth come back, nothing earlier.
    const after = live4[1].event.replayId;
    const resumed = jsforceClient(conn, 'jsforce-resumed', { replayId: after });
    closers.push(resumed.recorder);
    const events = await subscribeDemo(resumed.recorder);
    const subOut = resumed.recorder.sent.items.find((m) => m.channel === '/meta/subscribe');
    assert.deepEqual(subOut.ext, { replay: { [DEMO.event]: after } });
    await events.waitForCount(() => true, 2, 'the two events after the replay ID', 10000);
    // Then a new event arrives live, after the replayed ones.
    const fresh = await publishDemo(server.base, conn.accessToken, { Message__c: 'r4' });
    await events.waitForCount(() => true, 3, 'the new event after the replayed ones', 10000);
    await sleep(GRACE_MS);
    assert.deepEqual(events.items.map((d) => d.event.EventUuid), [uuids[2], uuids[3], fresh]);
    const ids = events.items.map((d) => d.event.replayId);
    assert.ok(ids.every((id) => id > after), `replay IDs ${ids} all after ${after}`);
    assert.deepEqual(ids.slice(0, 2), [live4[2].event.replayId, live4[3].event.replayId]);

    // -2: everything retained, the four events above among them, in order.
    const all = jsforceClient(conn, 'jsforce-all', { replayId: -2 });
    closers.push(all.recorder);
    const allEvents = await subscribeDemo(all.recorder);
    await allEvents.waitFor((d) => d.event.EventUuid === fresh, 'replay -2 reaches the newest event', 10000);
    const allUuids = allEvents.items.map((d) => d.event.EventUuid);
    const at = allUuids.indexOf(uuids[0]);
    assert.ok(at >= 0, 'replay -2 includes the first of the four events');
    assert.deepEqual(allUuids.slice(at), [...uuids, fresh]);
    await resumed.recorder.close();
    await all.recorder.close();
  });
});

describe('jsforce AuthFailure extension on token revocation', () => {
  let server;
  const closers = [];
  before(async () => {
    server = await startSalesforce({ connectTimeout: 2 });
  });
  after(async () => {
    for (const c of closers.splice(0)) await c.close();
    if (server) await server.stop();
  });

  it('fires on 401::Authentication invalid with reconnect none; a new login recovers',
    { timeout: TEST_TIMEOUT_MS }, async () => {
      const { conn } = await login(server.base);
      const s = jsforceClient(conn, 'jsforce-authfailure');
      closers.push(s.recorder);
      const events = await subscribeDemo(s.recorder);
      const before = await publishDemo(server.base, conn.accessToken, { Message__c: 'before' });
      await events.waitFor((d) => d.event.EventUuid === before, 'event before the revocation');

      const revoked = await fault(server.base, 'revoke');
      assert.ok(revoked.revoked >= 1, JSON.stringify(revoked));
      // The held connect returns within the 2 s hold; the next connect is refused.
      const failure = await s.authFailures.waitFor(() => true, 'AuthFailure callback', 8000);
      assert.equal(failure.channel, '/meta/connect');
      assert.equal(failure.successful, false);
      assert.equal(failure.error, '401::Authentication invalid');
      assert.deepEqual(failure.advice, { reconnect: 'none', interval: 0 });
      assert.equal(s.authFailures.items.length, 1);

      // The old token is dead for REST too.
      const { status } = await publishEvent(server.base, conn.accessToken, { Message__c: 'x' });
      assert.equal(status, 401);

      // What an application does in the callback: log in again, new client, resubscribe
      // from the last replay ID it saw.
      await s.recorder.close();
      const again = await login(server.base);
      const lastSeen = events.items[events.items.length - 1].event.replayId;
      const r = jsforceClient(again.conn, 'jsforce-relogin', { replayId: lastSeen });
      closers.push(r.recorder);
      const recovered = await subscribeDemo(r.recorder);
      const missed = await publishDemo(server.base, again.conn.accessToken, { Message__c: 'after' });
      await recovered.waitFor((d) => d.event.EventUuid === missed, 'event after re-login', 10000);
      assert.equal(r.authFailures.items.length, 0);
      await r.recorder.close();
    });

  it('fires when the access token expires (--sf-token-lifetime)', { timeout: TEST_TIMEOUT_MS }, async () => {
    const short = await startSalesforce({ connectTimeout: 1, tokenLifetime: 3 });
    let s;
    try {
      const { conn } = await login(short.base);
      const issued = Date.now();
      s = jsforceClient(conn, 'jsforce-expiry');
      await subscribeDemo(s.recorder);
      const failure = await s.authFailures.waitFor(() => true, 'AuthFailure after token expiry', 10000);
      assert.ok(Date.now() - issued >= 2500, `AuthFailure after ${Date.now() - issued} ms, before expiry`);
      assert.equal(failure.channel, '/meta/connect');
      assert.equal(failure.error, '401::Authentication invalid');
      assert.equal(failure.advice && failure.advice.reconnect, 'none');
    } finally {
      if (s) await s.recorder.close();
      await short.stop();
    }
  });
});

describe('a plain Faye client without the AuthFailure extension', () => {
  let server;
  let recorder;
  before(async () => {
    server = await startSalesforce({ connectTimeout: 2 });
  });
  after(async () => {
    if (recorder) await recorder.close();
    if (server) await server.stop();
  });

  it('goes silent after the token is revoked: no events, no error, no retry',
    { timeout: TEST_TIMEOUT_MS }, async () => {
      const faye = loadFaye();
      const { conn } = await login(server.base);
      const client = new faye.Client(`${server.base}/cometd/59.0`);
      client.setHeader('Authorization', `OAuth ${conn.accessToken}`);
      recorder = new FayeRecorder('plain-faye');
      client.addExtension(recorder.extension);
      recorder.watch(client);
      const errors = [];
      const events = new Inbox('plain Faye listener');
      const { subscription } = await recorder.subscribe(DEMO.event, (data) => events.push(data));
      subscription.errback((e) => errors.push(e));

      const first = await publishDemo(server.base, conn.accessToken, { Message__c: 'live' });
      await events.waitFor((d) => d.event.EventUuid === first, 'event before the revocation');

      await fault(server.base, 'revoke');
      const revokedAt = Date.now();
      // The emulator answers the client's next connect with Salesforce's auth failure.
      const refused = await recorder.wire.waitFor(
        (m) => m.channel === '/meta/connect' && m.successful === false,
        'the /meta/connect reply after the revocation', 8000);
      assert.equal(refused.error, '401::Authentication invalid');
      assert.deepEqual(refused.advice, { reconnect: 'none', interval: 0 });
      const refusedAt = recorder.wire.items.indexOf(refused);
      const sentBefore = recorder.sent.items.length;

      // Events keep being published (by someone with a valid token)...
      const { conn: other } = await login(server.base);
      const missed = [];
      for (let i = 0; i < 3; i++) {
        missed.push(await publishDemo(server.base, other.accessToken, { Message__c: `missed${i}` }));
      }
      // ...and the client hears nothing, says nothing and tries nothing.
      await sleep(SILENCE_MS);
      assert.deepEqual(events.items.map((d) => d.event.EventUuid), [first],
        'the Faye client received no event after the revocation');
      assert.deepEqual(recorder.wire.items.slice(refusedAt + 1), [],
        'nothing at all reached the client after the refused connect');
      assert.deepEqual(recorder.sent.items.slice(sentBefore).map((m) => m.channel), [],
        'the client sent nothing after the refused connect (no connect, no handshake)');
      assert.deepEqual(recorder.events.filter((e) => e.type === 'transport:down' && e.at >= revokedAt), [],
        'no transport:down was raised to the application');
      assert.deepEqual(errors, [], 'no subscription error was raised');
      // Faye still believes it is connected.
      assert.equal(client._state, client.CONNECTED);
    });
});
