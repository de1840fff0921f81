// The npm `pusher` server SDK against wsboard's HTTP API: triggers, a batch and channel
// queries, each answer printed as one JSON object; or, with "sendToUser" in the config, that
// one call. Usage: node server_sdk.js CONFIG_JSON
'use strict';
const Pusher = require('pusher');

const config = JSON.parse(process.argv[2]);
const sdk = new Pusher({
  appId: config.appId, key: config.key, secret: config.secret,
  host: '127.0.0.1', port: String(config.port), useTLS: false,
});

(async () => {
  if (config.sendToUser) { // [user id, event, data]: what a Laravel app's sendToUser does
    const answer = await sdk.sendToUser(...config.sendToUser);
    console.log(JSON.stringify({ status: answer.status }));
    return;
  }
  const out = {};
  out.trigger = (await sdk.trigger('lobby', 'hello', { from: 'node' })).status;
  out.batch = (await sdk.triggerBatch([{ channel: 'lobby', name: 'b1', data: 'x' }])).status;
  out.channels = await (await sdk.get({ path: '/channels' })).json();
  out.lobby = await (await sdk.get({ path: '/channels/lobby', params: { info: 'subscription_count' } })).json();
  try {
    await sdk.get({ path: '/channels/lobby/users' });
  } catch (error) {
    out.users = error.status; // users are listed for presence channels only
  }
  console.log(JSON.stringify(out));
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
