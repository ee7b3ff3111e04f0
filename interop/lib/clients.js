'use strict';
// Uniform wrappers around the real third-party clients, so that one set of scenarios
// (lib/scenarios.js) runs against each client library and transport.
//
// Every wrapper exposes:
//   handshake()            -> {successful, clientId} (the handshake reply)
//   subscribe(ch, fn)      -> handle; resolves once the server acknowledged the subscribe
//   unsubscribe(handle)    -> resolves once the server acknowledged the unsubscribe
//   publish(ch, data)      -> resolves once the server acknowledged the publish
//   disconnect()           -> the /meta/disconnect reply
//   wire                   -> Inbox of every message received from the server (before the
//                             library fans it out to its local listeners)
//   connectTypes()         -> connectionType of every /meta/connect the client sent
//   transportType()        -> the transport the library says it is using

const { createRequire } = require('node:module');
const { pathToFileURL } = require('node:url');
const { Inbox, withTimeout, DEFAULT_WAIT_MS } = require('./util');

const localRequire = createRequire(__filename);

let cometdLib;
/**
 * Loads the CometD JS client (an ES module) and installs the Node adapter once.
 * Both packages are resolved from this package's node_modules and imported by file URL,
 * so they share one module instance with anything else importing them.
 */
async function loadCometD() {
  if (cometdLib) return cometdLib;
  const cometdUrl = pathToFileURL(localRequire.resolve('cometd')).href;
  const adapterUrl = pathToFileURL(localRequire.resolve('cometd-nodejs-client')).href;
  const [lib, adapter] = await Promise.all([import(cometdUrl), import(adapterUrl)]);
  // Installs window.XMLHttpRequest (node:http) and window.WebSocket (ws): must run before
  // any CometD object is created.
  adapter.adapt();
  cometdLib = lib;
  return lib;
}

class CometDClient {
  constructor(lib, url, transport, name) {
    this.name = name;
    this.wire = new Inbox(`${name} wire`);
    this.sent = [];
    const cometd = new lib.CometD(name);
    cometd.configure({ url, logLevel: 'warn', maxNetworkDelay: 5000 });
    // The client registers websocket, long-polling and callback-polling and falls back
    // silently: keep only the transport under test (transport null: keep them all).
    if (transport) {
      for (const type of cometd.getTransportTypes()) {
        if (type !== transport) cometd.unregisterTransport(type);
      }
      const left = cometd.getTransportTypes();
      if (left.length !== 1 || left[0] !== transport) {
        throw new Error(`could not restrict CometD to ${transport}: ${JSON.stringify(left)}`);
      }
    }
    // An extension sees each message exactly as it came off the wire, once, before the
    // library dispatches it to every matching local listener.
    cometd.registerExtension('interop-wire', {
      incoming: (message) => { this.wire.push(message); return message; },
      outgoing: (message) => { this.sent.push(message); return message; },
    });
    this.cometd = cometd;
  }

  handshake() {
    return withTimeout(new Promise((resolve, reject) => {
      this.cometd.handshake((reply) => {
        if (reply.successful) resolve(reply);
        else reject(new Error(`handshake failed: ${JSON.stringify(reply)}`));
      });
    }), DEFAULT_WAIT_MS, `${this.name} handshake`);
  }

  subscribe(channel, listener) {
    let handle;
    const p = new Promise((resolve, reject) => {
      handle = this.cometd.subscribe(channel, (message) => listener(message.channel, message.data),
        (reply) => {
          if (reply.successful) resolve(handle);
          else reject(new Error(`subscribe ${channel} failed: ${JSON.stringify(reply)}`));
        });
    });
    return withTimeout(p, DEFAULT_WAIT_MS, `${this.name} subscribe ${channel}`);
  }

  unsubscribe(handle) {
    return withTimeout(new Promise((resolve, reject) => {
      this.cometd.unsubscribe(handle, (reply) => {
        if (reply.successful) resolve(reply);
        else reject(new Error(`unsubscribe ${handle.channel} failed: ${JSON.stringify(reply)}`));
      });
    }), DEFAULT_WAIT_MS, `${this.name} unsubscribe ${handle.channel}`);
  }

  publish(channel, data) {
    return withTimeout(new Promise((resolve, reject) => {
      this.cometd.publish(channel, data, (reply) => {
        if (reply.successful) resolve(reply);
        else reject(new Error(`publish to ${channel} failed: ${JSON.stringify(reply)}`));
      });
    }), DEFAULT_WAIT_MS, `${this.name} publish ${channel}`);
  }

  disconnect() {
    return withTimeout(new Promise((resolve, reject) => {
      this.cometd.disconnect((reply) => {
        if (reply.successful) resolve(reply);
        else reject(new Error(`disconnect failed: ${JSON.stringify(reply)}`));
      });
    }), DEFAULT_WAIT_MS, `${this.name} disconnect`);
  }

  /** Best effort, for cleanup after a failure: never throws, never hangs. */
  async close() {
    try {
      if (!this.cometd.isDisconnected()) await this.disconnect();
    } catch (_) { /* the test already failed */ }
  }

  connectTypes() {
    return this.sent.filter((m) => m.channel === '/meta/connect').map((m) => m.connectionType);
  }

  transportType() {
    const t = this.cometd.getTransport();
    // CometD 9 exposes the type as a getter (`transport.type`); older releases had getType().
    return t ? (typeof t.getType === 'function' ? t.getType() : t.type) : null;
  }
}

let fayeLib;
function loadFaye() {
  if (!fayeLib) fayeLib = localRequire('faye');
  return fayeLib;
}

class FayeClient {
  constructor(url, transport, name) {
    const faye = loadFaye();
    this.name = name;
    this.wire = new Inbox(`${name} wire`);
    this.sent = [];
    const client = new faye.Client(url, { timeout: 10, retry: 1 });
    // transport null: leave Faye free to pick (it upgrades to WebSocket when it can).
    if (transport === 'long-polling') {
      client.disable('websocket');
    } else if (transport !== 'websocket' && transport !== null) {
      throw new Error(`unsupported Faye transport ${transport}`);
    }
    this.transport = transport;
    this.out = new Inbox(`${name} outgoing`);
    // Index in this.sent from which /meta/connect must use the transport under test.
    this.readyAt = 0;
    client.addExtension({
      incoming: (message, callback) => { this.wire.push(message); callback(message); },
      outgoing: (message, callback) => {
        this.sent.push(message);
        this.out.push(message);
        callback(message);
      },
    });
    this.client = client;
  }

  async handshake() {
    // connect() handshakes first, then starts the /meta/connect loop; its callback runs once
    // the handshake succeeded. Faye retries a failed handshake forever: the wait is bounded.
    await withTimeout(new Promise((resolve) => this.client.connect(resolve)),
      DEFAULT_WAIT_MS, `${this.name} handshake`);
    const reply = this.wire.items.find((m) => m.channel === '/meta/handshake' && m.successful);
    if (!reply) throw new Error(`${this.name}: no successful /meta/handshake reply seen`);
    if (this.transport === 'websocket') {
      // Faye handshakes over HTTP (long-polling is its mandatory type), then probes a
      // WebSocket and switches to it once it opened. Until then, /meta/connect may still go
      // over HTTP (seen on a loaded machine). Wait for the switch, so that everything the
      // test does afterwards goes over the WebSocket; connectTypes() then covers the
      // connects from the switch on, which must all be websocket.
      const first = await this.out.waitFor(
        (m) => m.channel === '/meta/connect' && m.connectionType === 'websocket',
        'first /meta/connect over websocket (Faye upgrade after the handshake)');
      this.readyAt = this.sent.indexOf(first);
    }
    return reply;
  }

  async subscribe(channel, listener) {
    const sub = this.client.subscribe(channel, (data) => listener(channel, data));
    await withTimeout(new Promise((resolve, reject) => sub.then(resolve, reject)),
      DEFAULT_WAIT_MS, `${this.name} subscribe ${channel}`);
    return { sub, channel };
  }

  async unsubscribe(handle) {
    // Faye's unsubscribe has no callback: watch for the server's reply instead.
    const before = this.wire.items.length;
    handle.sub.cancel();
    const reply = await this.wire.waitFor((m) => m.channel === '/meta/unsubscribe' &&
      [].concat(m.subscription).includes(handle.channel) &&
      this.wire.items.indexOf(m) >= before, `unsubscribe reply for ${handle.channel}`);
    if (!reply.successful) throw new Error(`unsubscribe ${handle.channel} failed: ${JSON.stringify(reply)}`);
    return reply;
  }

  publish(channel, data) {
    const pub = this.client.publish(channel, data);
    return withTimeout(new Promise((resolve, reject) => pub.then(resolve, reject)),
      DEFAULT_WAIT_MS, `${this.name} publish ${channel}`);
  }

  async disconnect() {
    const pub = this.client.disconnect();
    if (!pub) throw new Error(`${this.name}: disconnect() refused (client not connected)`);
    await withTimeout(new Promise((resolve, reject) => pub.then(resolve, reject)),
      DEFAULT_WAIT_MS, `${this.name} disconnect`);
    const reply = this.wire.items.find((m) => m.channel === '/meta/disconnect');
    if (!reply || !reply.successful) throw new Error(`disconnect failed: ${JSON.stringify(reply)}`);
    return reply;
  }

  async close() {
    try {
      if (this.client._state === this.client.CONNECTED) await this.disconnect();
    } catch (_) { /* the test already failed */ }
    // Stop any connect or handshake retry loop (Faye retries forever), so that a client that
    // could not disconnect cleanly cannot keep the test process alive.
    this.client._state = this.client.DISCONNECTED;
    try { this.client._dispatcher.close(); } catch (_) { /* ignore */ }
  }

  connectTypes() {
    return this.sent.slice(this.readyAt)
      .filter((m) => m.channel === '/meta/connect').map((m) => m.connectionType);
  }

  transportType() {
    // Private field, used only as a second opinion next to connectTypes().
    return this.client._dispatcher.connectionType || null;
  }
}

/**
 * Adapters: one per (library, transport) pair under test. `transport` null leaves the
 * library all its transports (used by the fallback test).
 */
function cometdAdapter(transport) {
  let seq = 0;
  const t = transport || 'any-transport';
  return {
    label: `CometD JS client over ${t}`,
    transport,
    async create(url, role) {
      const lib = await loadCometD();
      return new CometDClient(lib, url, transport, `cometd-${t}-${role}-${++seq}`);
    },
  };
}

function fayeAdapter(transport) {
  let seq = 0;
  const t = transport || 'any-transport';
  return {
    label: `Faye client over ${t}`,
    transport,
    async create(url, role) {
      return new FayeClient(url, transport, `faye-${t}-${role}-${++seq}`);
    },
  };
}

module.exports = { loadCometD, loadFaye, cometdAdapter, fayeAdapter };
