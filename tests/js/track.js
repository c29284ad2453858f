// Drives `tracker serve` with the unmodified npm client faktory-worker, the way a
// Node worker would: client.send([...]) and client.sendWithAssert([...], "OK").
// Usage: node track.js PORT PASSWORD MODE JID   (PASSWORD "-" for none)
//   MODE set:   TRACK SET, bad TRACK SET, TRACK GET of an unknown JID, a wrong password
//   MODE get:   TRACK GET of JID
//   MODE setget: TRACK SET then TRACK GET of JID on one connection (read-your-writes)
// Prints one JSON object on stdout; exits 1 on any unexpected failure.
"use strict";
const { Client } = require("faktory-worker");

async function main() {
  const [port, password, mode, jid] = process.argv.slice(2);
  const opts = { host: "127.0.0.1", port: Number(port), poolSize: 1 };
  if (password !== "-") opts.password = password;
  const client = new Client(opts);
  const out = {};
  try {
    if (mode === "set") {
      out.set = await client.sendWithAssert(
        ["TRACK", "SET", JSON.stringify({ jid, percent: 33, desc: "from node", reserve_until: null })], "OK");
      try {
        await client.send(["TRACK", "SET", JSON.stringify({ jid, percent: 150 })]);
        out.bad = "no error";
      } catch (e) {
        out.bad = String(e.message);
      }
      out.unknown = JSON.parse(await client.send(["TRACK", "GET", "node-never-" + jid]));
      const wrong = new Client({ host: "127.0.0.1", port: Number(port), password: "wrong-" + password });
      try {
        await wrong.connect();
        out.wrong_password = "accepted";
      } catch (e) {
        out.wrong_password = String(e.message);
      }
    } else if (mode === "setget") {
      out.set = await client.sendWithAssert(
        ["TRACK", "SET", JSON.stringify({ jid, percent: 12, desc: "Calculating..." })], "OK");
      out.get = JSON.parse(await client.send(["TRACK", "GET", jid]));
    } else {
      out.get = JSON.parse(await client.send(["TRACK", "GET", jid]));
    }
  } finally {
    await client.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().then(() => process.exit(0), (e) => {
  process.stderr.write(`node client failed: ${e && e.stack || e}\n`);
  process.exit(1);
});
