'use strict';
// Helpers for the tests against the Salesforce emulator (`bayeux serve --salesforce`):
// start it, log in with jsforce, publish platform events through REST, inject faults, and
// record what a Faye-based streaming client (jsforce's or a plain Faye one) sees.

const { createRequire } = require('node:module');
const { startServer } = require('./server');
const { Inbox, withTimeout, DEFAULT_WAIT_MS } = require('./util');

const localRequire = createRequire(__filename);

// The demo org of `bayeux serve --salesforce` (printed on its stderr).
const DEMO = {
  username: 'demo@example.com',
  password: 'demo',
  clientId: 'demo',
  clientSecret: 'demo',
  orgId: '00D000000000001AAA',
  userId: '005000000000001AAA',
  event: '/event/Demo__e',
};

let jsforceLib;
function loadJsforce() {
  if (!jsforceLib) {
    jsforceLib = localRequire('jsforce');
    // StreamingExtension is not re-exported by the package root in 3.10.16: it lives in
    // jsforce/api/streaming (as jsforce's own docs show).
    jsforceLib.StreamingExtension = jsforceLib.StreamingExtension ||
      localRequire('jsforce/api/streaming').StreamingExtension;
  }
  return jsforceLib;
}

/**
 * Starts `bayeux serve --salesforce` with short timeouts: connects are held `connectTimeout`
 * seconds (also the first connect's advice.timeout), so that a fault is seen by the client's
 * next connect within that time. Resolves with the server handle plus `base` (the instance
 * URL: the server URL without /cometd).
 */
async function startSalesforce({ connectTimeout = 2, tokenLifetime, reconnectDeadline } = {}) {
  const args = ['--salesforce', '--sf-connect-timeout', String(connectTimeout)];
  if (tokenLifetime !== undefined) args.push('--sf-token-lifetime', String(tokenLifetime));
  if (reconnectDeadline !== undefined) args.push('--sf-reconnect-deadline', String(reconnectDeadline));
  const server = await startServer(args);
  const base = server.url.replace(/\/cometd\/?$/, '');
  return { ...server, base };
}

/**
 * A jsforce Connection logged in as the demo user. `soap: true` leaves out the connected
 * app's clientId/secret, so jsforce uses the SOAP login instead of the OAuth password grant.
 */
async function login(base, { soap = false, password = DEMO.password } = {}) {
  const jsforce = loadJsforce();
  const options = soap
    ? { loginUrl: base }
    : { loginUrl: base, oauth2: { clientId: DEMO.clientId, clientSecret: DEMO.clientSecret, loginUrl: base } };
  const conn = new jsforce.Connection(options);
  const userInfo = await withTimeout(conn.login(DEMO.username, password), DEFAULT_WAIT_MS,
    `${soap ? 'SOAP' : 'OAuth password'} login`);
  return { conn, userInfo };
}

/** POST {base}/services/data/v59.0/sobjects/Demo__e/ → {status, body}. */
async function publishEvent(base, token, fields, object = 'Demo__e') {
  const res = await fetch(`${base}/services/data/v59.0/sobjects/${object}/`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(fields),
    signal: AbortSignal.timeout(DEFAULT_WAIT_MS),
  });
  const text = await res.text();
  let body;
  try { body = JSON.parse(text); } catch (_) { body = text; }
  return { status: res.status, body };
}

/** POST {base}/_emulator/<fault>[?query] → parsed JSON reply. */
async function fault(base, name, query = '') {
  const res = await fetch(`${base}/_emulator/${name}${query ? `?${query}` : ''}`, {
    method: 'POST',
    signal: AbortSignal.timeout(DEFAULT_WAIT_MS),
  });
  if (!res.ok) throw new Error(`/_emulator/${name}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

/**
 * Records what a Faye client (jsforce's streaming client is one) exchanges: `wire` gets
 * every incoming message, `sent` every outgoing one, `events` the client's transport:up/down.
 * Add `extension` FIRST: Faye pipes messages through extensions in the order they were added,
 * in both directions, and jsforce's AuthFailure swallows the message it reacts to, so only a
 * recorder ahead of it sees that message. Outgoing messages are kept by reference, so what
 * later extensions add (jsforce's Replay puts ext.replay on /meta/subscribe) shows too.
 */
class FayeRecorder {
  constructor(name) {
    this.name = name;
    this.wire = new Inbox(`${name} wire`);
    this.sent = new Inbox(`${name} sent`);
    this.events = new Inbox(`${name} transport events`);
    this.extension = {
      incoming: (message, callback) => { this.wire.push(message); callback(message); },
      outgoing: (message, callback) => { this.sent.push(message); callback(message); },
    };
  }

  /** Call once the Faye client exists. */
  watch(client) {
    this.client = client;
    client.on('transport:down', () => this.events.push({ type: 'transport:down', at: Date.now() }));
    client.on('transport:up', () => this.events.push({ type: 'transport:up', at: Date.now() }));
  }

  /**
   * Subscribes; resolves once the server acknowledged it, with `{subscription}` (the Faye
   * Subscription is a thenable, so it cannot be an async function's result itself).
   */
  async subscribe(channel, listener) {
    const subscription = this.client.subscribe(channel, listener);
    await withTimeout(new Promise((resolve, reject) => subscription.then(resolve, reject)),
      DEFAULT_WAIT_MS, `${this.name} subscribe ${channel}`);
    return { subscription };
  }

  /** Best effort: disconnect if possible, then stop any retry loop. Never throws. */
  async close() {
    const client = this.client;
    if (!client) return;
    try {
      if (client._state === client.CONNECTED) {
        const pub = client.disconnect();
        if (pub) {
          await withTimeout(new Promise((resolve) => pub.then(resolve, resolve)), 3000,
            `${this.name} disconnect`).catch(() => {});
        }
      }
    } catch (_) { /* cleanup only */ }
    // Faye retries handshakes forever and keeps timers: make sure nothing keeps running.
    client._state = client.DISCONNECTED;
    try { client._dispatcher.close(); } catch (_) { /* ignore */ }
  }
}

module.exports = { DEMO, loadJsforce, startSalesforce, login, publishEvent, fault, FayeRecorder };
