'use strict';
// The Faye client (faye 1.4.3) against `bayeux serve`, over long-polling
// (client.disable('websocket')) and over WebSocket.

const { before, after, describe } = require('node:test');
const { startServer } = require('../lib/server');
const { fayeAdapter } = require('../lib/clients');
const { defineInteropSuite, defineFallbackTest } = require('../lib/scenarios');
const { exitIfStuck } = require('../lib/util');

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  if (server) await server.stop();
  exitIfStuck();
});

const url = () => server.url;
defineInteropSuite(fayeAdapter('long-polling'), url);
defineInteropSuite(fayeAdapter('websocket'), url);

describe('server offering only long-polling', () => {
  let lpOnly;
  before(async () => {
    lpOnly = await startServer(['--transports', 'long-polling']);
  });
  after(async () => {
    if (lpOnly) await lpOnly.stop();
  });
  defineFallbackTest(fayeAdapter(null), () => lpOnly.url);
});
