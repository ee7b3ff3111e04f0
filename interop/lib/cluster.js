'use strict';
// Several `bayeux serve --engine redis` nodes sharing one redis-server, and a per-request
// round-robin HTTP proxy in front of them: every request (a held /meta/connect included) goes
// to the next node in turn, so a client's requests alternate between nodes.
// Only processes started here are ever signalled, by their own PIDs.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { sleep } = require('./util');

/** The `redis-server` on PATH, or null. */
function findRedisServer() {
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, 'redis-server');
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch (_) { /* not here */ }
  }
  return null;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Sends PING on a fresh connection; resolves true on +PONG within 500 ms. */
function ping(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    let buf = '';
    const done = (ok) => { socket.destroy(); resolve(ok); };
    socket.setTimeout(500, () => done(false));
    socket.once('error', () => done(false));
    socket.on('data', (d) => {
      buf += d;
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
    socket.once('connect', () => socket.write('PING\r\n'));
  });
}

/**
 * Starts redis-server on a free loopback port in a fresh temporary directory, persisting every
 * write (`appendonly yes`, `appendfsync always`), and resolves with {url, port, pid, stop()}
 * once it answers PING. Throws, saying how to install it, when redis-server is not on PATH.
 */
async function startRedis({ startTimeoutMs = 15000 } = {}) {
  const bin = findRedisServer();
  if (!bin) {
    throw new Error('redis-server is not on PATH: install it (Debian/Ubuntu: apt-get install -y ' +
      'redis-server) or run scripts/test.sh, which installs it when run as root');
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bayeux-interop-redis-'));
  const port = await freePort();
  const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '',
    '--appendonly', 'yes', '--appendfsync', 'always', '--dir', dir,
    '--logfile', path.join(dir, 'redis.log'), '--daemonize', 'no'],
  { stdio: ['ignore', 'ignore', 'ignore'] });
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (error) => resolve({ error }));
  });
  const onExit = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  process.once('exit', onExit);
  async function stop() {
    process.removeListener('exit', onExit);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const deadline = Date.now() + startTimeoutMs;
  while (!(await ping(port))) {
    if (child.exitCode !== null || child.signalCode !== null || Date.now() > deadline) {
      const log = fs.existsSync(path.join(dir, 'redis.log'))
        ? fs.readFileSync(path.join(dir, 'redis.log'), 'utf8').split('\n').slice(-5).join(' | ')
        : '';
      await stop();
      throw new Error(`redis-server did not answer PING on port ${port}: ${log}`);
    }
    await sleep(20);
  }
  return { url: `redis://127.0.0.1:${port}/0`, port, pid: child.pid, stop };
}

/**
 * A per-request round-robin HTTP proxy: request k goes to `targets[k % n]` (each a Bayeux URL;
 * the request path is forwarded as it is). Every routed request is recorded in `routed` as
 * {target, channels} (the Bayeux channels of its body). Resolves with
 * {url(path), routed, close()}.
 */
async function startRoundRobinProxy(targets) {
  const backends = targets.map((t) => new URL(t));
  const agent = new http.Agent({ keepAlive: true });
  const routed = [];
  let next = 0;
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const index = next++ % backends.length;
      const backend = backends[index];
      let channels = [];
      try {
        channels = [].concat(JSON.parse(body.toString('utf8'))).map((m) => m && m.channel);
      } catch (_) { /* not JSON: forwarded as it is */ }
      routed.push({ target: index, channels });
      const headers = { ...req.headers, host: backend.host, 'content-length': body.length };
      const upstream = http.request({
        host: backend.hostname, port: backend.port, path: req.url, method: req.method,
        headers, agent,
      }, (up) => {
        res.writeHead(up.statusCode, up.headers);
        up.pipe(res);
      });
      upstream.on('error', (e) => {
        if (!res.headersSent) res.writeHead(502, { 'content-type': 'text/plain' });
        res.end(`proxy: ${e.message}`);
      });
      upstream.end(body);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    url: (pathname) => `http://127.0.0.1:${port}${pathname}`,
    routed,
    close: () => new Promise((resolve) => {
      agent.destroy();
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

module.exports = { findRedisServer, startRedis, startRoundRobinProxy };
