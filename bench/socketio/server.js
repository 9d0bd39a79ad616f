// The Socket.IO peer of Slotcast's fan-out benchmark (bench/compare.py, bench/fanout.py).
//
// Why it exists: Slotcast's latency, CPU and memory figures only mean something on a
// shared machine as ratios against what users would pick instead, measured in the same
// run by the same load generator. This is that "instead", written as a newcomer would:
// Socket.IO 4 with the official Redis adapter, several instances behind one Redis.
//
//   PORT=8001 REDIS_URL=redis://127.0.0.1:6379/0 node server.js
//
// A client connects (Engine.IO v4 over WebSocket), emits `watch` with a doctor id, joins
// that doctor's room and gets a `snapshot` event (the benchmark's "ready"). The change
// source is POST /change {"doctor": id, "delta": {...}} on any instance: the delta is
// emitted to the doctor's room, so the Redis adapter carries it to every instance. Unlike
// Slotcast's booking, nothing is committed anywhere: the peer's latency has no database
// in it (docs/benchmarks.md says so beside the figures).
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const port = Number(process.env.PORT || 8001);
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379/0";

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  const server = http.createServer((req, res) => {
    if (req.method === "GET" && req.url === "/health") {
      res.end("ok");
      return;
    }
    if (req.method === "POST" && req.url === "/change") {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        let change;
        try {
          change = JSON.parse(Buffer.concat(chunks).toString());
        } catch {
          res.writeHead(400);
          res.end("bad json");
          return;
        }
        io.to(`doctor:${change.doctor}`).emit("delta", change.delta);
        res.writeHead(204);
        res.end();
      });
      return;
    }
    res.writeHead(404);
    res.end();
  });

  const io = new Server(server, {
    adapter: createAdapter(pub, sub),
    transports: ["websocket"], // the generator speaks WebSocket only, as Slotcast's clients do
    serveClient: false,
    // Engine.IO pings every 25 s by default; a shorter PING_INTERVAL_MS exercises the
    // watchers' pong path in a short run.
    pingInterval: Number(process.env.PING_INTERVAL_MS || 25000),
  });
  io.on("connection", (socket) => {
    socket.on("watch", (doctor) => {
      socket.join(`doctor:${doctor}`);
      socket.emit("snapshot", { doctor_id: doctor, slots: [] });
    });
  });

  server.listen(port, "127.0.0.1", () => console.log(`socket.io peer on ${port}`));
  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
