'use strict';
// Starts one `bayeux serve` child process for a test file and stops it again.
// Only the process started here is ever signalled, by its own PID.

const { spawn } = require('node:child_process');
const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');
const readline = require('node:readline');

const INTEROP_DIR = path.resolve(__dirname, '..');
const DEFAULT_BIN = path.resolve(INTEROP_DIR, '..', 'target', 'debug', 'bayeux');

function bayeuxBin() {
  const bin = process.env.BAYEUX_BIN
    ? path.resolve(INTEROP_DIR, process.env.BAYEUX_BIN)
    : DEFAULT_BIN;
  if (!fs.existsSync(bin)) {
    throw new Error(`bayeux binary not found at ${bin}: run \`cargo build -p bayeux-cli\` ` +
      'or set BAYEUX_BIN');
  }
  return bin;
}

/**
 * Spawns `bayeux serve --bind 127.0.0.1:0 --connect-timeout-ms 2000 [extraArgs]` and resolves
 * with {url, pid, stop(), stderr()} once the first stdout line `LISTENING <url>` is read.
 */
function startServer(extraArgs = [], { startTimeoutMs = 15000 } = {}) {
  const bin = bayeuxBin();
  const args = ['serve', '--bind', '127.0.0.1:0', '--connect-timeout-ms', '2000', ...extraArgs];
  // Each server gets a fresh data directory (the disk engine defaults to ./data), removed on
  // stop: no state leaks between servers or runs. Set by environment variable so that a
  // binary without --data-dir still starts.
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bayeux-interop-'));
  const removeDataDir = () => fs.rmSync(dataDir, { recursive: true, force: true });
  const child = spawn(bin, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, BAYEUX_DATA_DIR: dataDir },
  });
  let stderrBuf = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderrBuf += chunk;
    if (stderrBuf.length > 200000) stderrBuf = stderrBuf.slice(-100000);
  });

  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', (error) => resolve({ error })); // e.g. not executable: no 'exit'
  });
  // Kill the child if this test process dies without calling stop().
  const onExit = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    try { removeDataDir(); } catch (_) { /* best effort */ }
  };
  process.once('exit', onExit);

  async function stop() {
    process.removeListener('exit', onExit);
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      let timer;
      const killed = new Promise((resolve) => {
        timer = setTimeout(() => { child.kill('SIGKILL'); resolve(); }, 7000);
      });
      await Promise.race([exited, killed]);
      clearTimeout(timer);
    }
    const status = await exited;
    removeDataDir();
    return status;
  }

  return new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: child.stdout });
    let done = false;
    const timer = setTimeout(() => {
      fail(new Error(`bayeux serve printed no LISTENING line within ${startTimeoutMs} ms; stderr:\n${stderrBuf}`));
    }, startTimeoutMs);
    function fail(err) {
      if (done) return;
      done = true;
      clearTimeout(timer);
      rl.close();
      stop().finally(() => reject(err));
    }
    child.once('error', fail);
    child.once('exit', (code, signal) => {
      fail(new Error(`bayeux serve exited early (code ${code}, signal ${signal}); stderr:\n${stderrBuf}`));
    });
    rl.once('line', (line) => {
      const m = /^LISTENING (http:\/\/\S+)$/.exec(line.trim());
      if (!m) {
        fail(new Error(`unexpected first stdout line from bayeux serve: ${JSON.stringify(line)}`));
        return;
      }
      done = true;
      clearTimeout(timer);
      // Keep draining stdout so the child never blocks on a full pipe.
      rl.on('line', () => {});
      resolve({ url: m[1], pid: child.pid, stop, stderr: () => stderrBuf });
    });
  });
}

module.exports = { startServer, bayeuxBin };
