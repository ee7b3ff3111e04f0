'use strict';
// Small helpers shared by the interop tests: bounded waits and message inboxes.

const DEFAULT_WAIT_MS = 5000;

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Rejects with a descriptive error if `promise` does not settle within `ms`. */
function withTimeout(promise, ms, label) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${label}`)), ms);
  });
  return Promise.race([Promise.resolve(promise), timeout]).finally(() => clearTimeout(timer));
}

/**
 * A list of received items with bounded waits on a predicate.
 * Used both for what a client receives from the wire (extension hook) and for what its
 * listeners are called with.
 */
class Inbox {
  constructor(name) {
    this.name = name;
    this.items = [];
    this.waiters = new Set();
  }

  push(item) {
    this.items.push(item);
    for (const w of [...this.waiters]) {
      if (w.pred(item)) {
        this.waiters.delete(w);
        w.resolve(item);
      }
    }
  }

  filter(pred) {
    return this.items.filter(pred);
  }

  /** Resolves with the first item (already received or future) matching pred. */
  waitFor(pred, label, ms = DEFAULT_WAIT_MS) {
    const found = this.items.find(pred);
    if (found !== undefined) return Promise.resolve(found);
    let waiter;
    const p = new Promise((resolve) => {
      waiter = { pred, resolve };
      this.waiters.add(waiter);
    });
    return withTimeout(p, ms, `${this.name}: ${label}`).finally(() => this.waiters.delete(waiter));
  }

  /** Resolves once `n` items match pred. */
  async waitForCount(pred, n, label, ms = DEFAULT_WAIT_MS) {
    const deadline = Date.now() + ms;
    while (this.items.filter(pred).length < n) {
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`timed out after ${ms} ms: ${this.name}: ${label} ` +
          `(have ${this.items.filter(pred).length} of ${n})`);
      }
      // Wake on the next matching item, or re-check after a short while.
      const waiter = { pred, resolve: () => {} };
      const p = new Promise((resolve) => { waiter.resolve = resolve; this.waiters.add(waiter); });
      await Promise.race([p, sleep(Math.min(left, 100))]);
      this.waiters.delete(waiter);
    }
  }
}

/** True for a message that carries application data on a broadcast channel (a delivery). */
function isDelivery(message) {
  return !!message && typeof message.channel === 'string' &&
    !message.channel.startsWith('/meta/') && message.data !== undefined;
}

/**
 * Call from a test file's last after() hook: if something (a client that could not be shut
 * down) still keeps the process alive `ms` later, exit with a failure instead of hanging the
 * whole `node --test` run. The timer is unref'd, so a clean process exits at once.
 */
function exitIfStuck(ms = 5000) {
  setTimeout(() => {
    process.stderr.write(`interop: process still alive ${ms} ms after its tests ended ` +
      '(a client left open handles); exiting with failure\n');
    process.exit(1);
  }, ms).unref();
}

module.exports = { sleep, withTimeout, Inbox, isDelivery, exitIfStuck, DEFAULT_WAIT_MS };
