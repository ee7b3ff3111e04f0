'use strict';
// The official CometD JavaScript client (cometd 9 + cometd-nodejs-client 2) against
// `bayeux serve`, over long-polling and over WebSocket.

const { before, after, describe } = require('node:test');
const { startServer } = require('../lib/server');
const { cometdAdapter, loadCometD } = require('../lib/clients');
const { defineInteropSuite, defineFallbackTest } = require('../lib/scenarios');
const { exitIfStuck } = require('../lib/util');

let server;
before(async () => {
  server = await startServer();
  await loadCometD();
});
after(async () => {
  if (server) await server.stop();
  exitIfStuck();
});

const url = () => server.url;
defineInteropSuite(cometdAdapter('long-polling'), url);
defineInteropSuite(cometdAdapter('websocket'), url);

describe('server offering only long-polling', () => {
  let lpOnly;
  before(async () => {
    lpOnly = await startServer(['--transports', 'long-polling']);
  });
  after(async () => {
    if (lpOnly) await lpOnly.stop();
  });
  defineFallbackTest(cometdAdapter(null), () => lpOnly.url);
});
