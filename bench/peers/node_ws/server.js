// The same job on Node.js `ws`, in its idiomatic form: a Set of sockets per id, a send loop
// for fan-out, compression off (unless DEFLATE=1), pings every 25 s like wsboard; a UNIX control socket that
// speaks wsboard's two verbs plus BROADCAST.
//
//     node bench/peers/node_ws/server.js PORT CONTROL_PATH
"use strict";
const net = require("net");
const { WebSocketServer } = require("ws");

const [port, path] = process.argv.slice(2);
const byId = new Map();
// DEFLATE=1 (bench/compression.py): permessage-deflate as wsboard's --compression has it,
// no context takeover either way and the same 512-byte threshold; ws deflates per socket.
const perMessageDeflate = process.env.DEFLATE
  ? { threshold: 512, serverNoContextTakeover: true, clientNoContextTakeover: true }
  : false;
const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(port), perMessageDeflate });

wss.on("connection", (ws, req) => {
  const id = new URL(req.url, "http://localhost").searchParams.get("id") || "";
  let group = byId.get(id);
  if (!group) byId.set(id, (group = new Set()));
  group.add(ws);
  ws.on("close", () => {
    group.delete(ws);
    if (!group.size) byId.delete(id);
  });
});

setInterval(() => wss.clients.forEach((ws) => ws.ping()), 25000);

net.createServer((conn) => {
  let buffer = "";
  conn.on("data", (data) => {
    buffer += data;
    const answers = [];
    let at;
    while ((at = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, at);
      buffer = buffer.slice(at + 1);
      if (line.startsWith("BROADCAST ")) {
        const text = line.slice("BROADCAST ".length);
        wss.clients.forEach((ws) => ws.send(text));
        answers.push(`OK ${wss.clients.size}`);
      } else if (line.startsWith("SEND MESSAGE ")) {
        const rest = line.slice("SEND MESSAGE ".length);
        const space = rest.indexOf(" ");
        const group = byId.get(rest.slice(0, space));
        if (group) group.forEach((ws) => ws.send(rest.slice(space + 1)));
        answers.push(group ? "OK" : "ERROR Client Not Found");
      } else {
        answers.push("ERROR Unknown command");
      }
    }
    if (answers.length) conn.write(answers.join("\n") + "\n");
  });
  conn.on("error", () => {});
}).listen(path);
