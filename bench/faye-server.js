// Faye 1.4.3 NodeAdapter with its default (memory) engine, for bench/compare.sh.
// Usage: node bench/faye-server.js PORT
// Serves Bayeux at http://127.0.0.1:PORT/faye (long-polling and WebSocket) and prints
// "LISTENING http://127.0.0.1:PORT/faye" once it accepts connections.
'use strict';

const http = require('http');
const faye = require('faye');

const port = Number(process.argv[2] || 8000);
// The same hold as bayeux's default connect_timeout_ms (30 s).
const bayeux = new faye.NodeAdapter({ mount: '/faye', timeout: 30 });
const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
// Thousands of held connects: no Node-side timeouts shorter than Faye's own hold.
server.keepAliveTimeout = 120000;
server.headersTimeout = 125000;
server.requestTimeout = 0;
bayeux.attach(server);
server.listen(port, '127.0.0.1', () => {
  console.log(`LISTENING http://127.0.0.1:${port}/faye`);
});
const stop = () => process.exit(0);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
