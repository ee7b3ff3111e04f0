'use strict';
// A Faye 1.4.3 server (NodeAdapter) on 127.0.0.1, port 0: a peer for the Rust client's tests
// (crates/bayeux-client/tests/peers.rs).
//
// stdout: first `LISTENING http://127.0.0.1:PORT/faye`, then one JSON line per server event:
// {"event":"handshake"|"subscribe"|"unsubscribe"|"publish"|"disconnect","clientId":…,"channel":…}.
// Options (environment): FAYE_TIMEOUT connect hold in seconds (default 2).
// Exits when stdin closes, so it never outlives the test that started it.

const http = require('node:http');
const faye = require('faye');

const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n');

const bayeux = new faye.NodeAdapter({
  mount: '/faye',
  timeout: Number(process.env.FAYE_TIMEOUT || 2),
});
bayeux.on('handshake', (clientId) => emit({ event: 'handshake', clientId }));
bayeux.on('subscribe', (clientId, channel) => emit({ event: 'subscribe', clientId, channel }));
bayeux.on('unsubscribe', (clientId, channel) => emit({ event: 'unsubscribe', clientId, channel }));
bayeux.on('publish', (clientId, channel) => emit({ event: 'publish', clientId, channel }));
bayeux.on('disconnect', (clientId) => emit({ event: 'disconnect', clientId }));

const server = http.createServer();
bayeux.attach(server);
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`LISTENING http://127.0.0.1:${server.address().port}/faye\n`);
});

process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
