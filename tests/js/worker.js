// Processes jobs through `tracker serve --upstream` with the unmodified npm client
// faktory-worker, as a Node app would (tests/test_proxy.py). A producer Client pushes two
// tracked jobs; a Worker runs them: "Progress" reports 50% with TRACK SET on the worker's
// own client and reads it back with TRACK GET, then returns (the worker ACKs it); "Boom"
// throws (the worker FAILs it).
// Usage: node worker.js PORT PASSWORD QUEUE JID_OK JID_BOOM   (PASSWORD "-" for none)
// Prints one JSON object on stdout; exits 1 on any unexpected failure.
"use strict";
const { Client, Worker } = require("faktory-worker");

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const [port, password, queue, ok, boom] = process.argv.slice(2);
  const opts = { host: "127.0.0.1", port: Number(port) };
  if (password !== "-") opts.password = password;
  const producer = new Client({ ...opts, poolSize: 1 });
  const out = {};
  await producer.push({ jid: ok, jobtype: "Progress", queue, args: [1], custom: { track: 1 }, retry: 3 });
  await producer.push({ jid: boom, jobtype: "Boom", queue, args: [], custom: { track: 1 }, retry: 1 });
  out.after_push = JSON.parse(await producer.send(["TRACK", "GET", ok]));
  const ran = new Set();
  let worker = null;
  worker = new Worker({
    ...opts,
    queues: [queue],
    concurrency: 1,
    registry: {
      Progress: () => async ({ job }) => {
        await worker.client.sendWithAssert(
          ["TRACK", "SET", JSON.stringify({ jid: job.jid, percent: 50, desc: "half way" })], "OK");
        out.during = JSON.parse(await worker.client.send(["TRACK", "GET", job.jid]));
        ran.add(job.jid);
      },
      Boom: () => async ({ job }) => {
        ran.add(job.jid);
        throw new Error("boom from node");
      },
    },
  });
  worker.on("fail", ({ job, error }) => {
    out.failed = { jid: job.jid, error: String(error && error.message) };
  });
  await worker.work();
  const deadline = Date.now() + 20000;
  while ((ran.size < 2 || !out.failed) && Date.now() < deadline) await sleep(20);
  await worker.stop();  // waits for the ACK / FAIL in flight
  out.ran = [...ran].sort();
  out.after = JSON.parse(await producer.send(["TRACK", "GET", ok]));
  await producer.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().then(() => process.exit(0), (e) => {
  process.stderr.write(`node worker failed: ${e && e.stack || e}\n`);
  process.exit(1);
});
