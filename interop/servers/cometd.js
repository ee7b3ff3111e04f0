'use strict';
// cometd-nodejs-server 1.2.1 (the CometD project's Node server: long-polling only) on
// 127.0.0.1, port 0, with its acknowledged-messages extension: a peer for the Rust client's
// tests (crates/bayeux-client/tests/peers.rs).
//
// stdout: first `LISTENING http://127.0.0.1:PORT/cometd`, then one JSON line per server event:
// {"event":"handshake"|"subscribe"|"unsubscribe"|"disconnect","clientId":…,"channel":…}
// ("disconnect" carries "timeout": true when the session expired instead).
// Options (environment): COMETD_TIMEOUT connect hold in ms (default 2000).
// Exits when stdin closes, so it never outlives the test that started it.
//
// This server binds each session to its BAYEUX_BROWSER cookie (`402::session_unknown` for a
// request without it) and delivers a message once per matching subscription.

const http = require('node:http');
const cometd = require('cometd-nodejs-server');
const { AcknowledgedMessagesExtension } = require('cometd-nodejs-server/ack-extension');

const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n');

const server = cometd.createCometDServer({
  timeout: Number(process.env.COMETD_TIMEOUT || 2000),
});
server.addExtension(new AcknowledgedMessagesExtension());
server.addListener('sessionAdded', (session) => emit({ event: 'handshake', clientId: session.id }));
server.addListener('sessionRemoved', (session, timeout) =>
  emit({ event: 'disconnect', clientId: session.id, timeout: Boolean(timeout) }));
server.addListener('subscribed', (channel, session) =>
  emit({ event: 'subscribe', clientId: session.id, channel: channel.name }));
server.addListener('unsubscribed', (channel, session) =>
  emit({ event: 'unsubscribe', clientId: session.id, channel: channel.name }));

const httpServer = http.createServer(server.handle);
httpServer.listen(0, '127.0.0.1', () => {
  process.stdout.write(`LISTENING http://127.0.0.1:${httpServer.address().port}/cometd\n`);
});

process.stdin.on('end', () => { server.close(); process.exit(0); });
process.stdin.resume();
