// The npm `pusher` SDK's own webhook validator, over what a test's receiver got: one JSON
// object per line on stdin ({headers, body}), one answer per line on stdout
// ({valid, events}). Usage: node webhook_check.js CONFIG_JSON
'use strict';
const readline = require('readline');
const Pusher = require('pusher');

const config = JSON.parse(process.argv[2]);
const sdk = new Pusher({ appId: config.appId, key: config.key, secret: config.secret });

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const { headers, body } = JSON.parse(line);
  const webhook = sdk.webhook({ headers, rawBody: body });
  const valid = webhook.isValid();
  const answer = { valid, events: valid ? webhook.getEvents() : null, time: valid ? webhook.getTime().getTime() : null };
  process.stdout.write(JSON.stringify(answer) + '\n');
});
