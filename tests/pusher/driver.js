// One real Pusher client (pusher-js, or Laravel Echo on it) driven by tests/test_pusher.py:
// commands come as JSON lines on stdin, everything the client sees goes out as JSON lines on
// stdout. Channel auth is signed by the real `pusher` server SDK (authorizeChannel), as a
// Laravel app's /broadcasting/auth would sign it. Usage: node driver.js CONFIG_JSON
'use strict';
const readline = require('readline');
const Pusher = require('pusher-js');
const PusherServer = require('pusher');

const config = JSON.parse(process.argv[2]);
const sdk = new PusherServer({
  appId: config.appId, key: config.key, secret: config.secret,
  host: '127.0.0.1', port: String(config.port), useTLS: false,
  encryptionMasterKeyBase64: config.encryptionMasterKeyBase64,
});
let user = config.user || null; // {user_id, user_info} for presence channels
let signinAs = config.signinAs || null; // {id, ...}: the user_data pusher.signin() is signed for

function out(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
}

const options = {
  wsHost: '127.0.0.1', wsPort: config.port, forceTLS: false, enabledTransports: ['ws'],
  cluster: '', disableStats: true,
  channelAuthorization: {
    customHandler: (params, callback) => {
      if (config.badAuth) {
        callback(null, { auth: config.key + ':' + '0'.repeat(64) });
      } else if (params.channelName.startsWith('presence-')) {
        callback(null, sdk.authorizeChannel(params.socketId, params.channelName, user));
      } else {
        callback(null, sdk.authorizeChannel(params.socketId, params.channelName));
      }
    },
  },
  userAuthentication: {
    customHandler: (params, callback) => {
      if (config.badAuth) {
        callback(null, { auth: config.key + ':' + '0'.repeat(64), user_data: JSON.stringify(signinAs) });
      } else {
        callback(null, sdk.authenticateUser(params.socketId, signinAs));
      }
    },
  },
};

let pusher, echo;

async function start() {
  if (config.echo) {
    // laravel-echo's package is an ES module (its CommonJS build does not load in Node 20).
    const Echo = (await import('laravel-echo')).default;
    echo = new Echo({ broadcaster: 'reverb', key: config.key, Pusher, ...options });
    pusher = echo.connector.pusher;
  } else {
    pusher = new Pusher(config.key, options);
  }
  pusher.connection.bind('state_change', (states) => out({ type: 'state', state: states.current }));
  pusher.connection.bind('connected', () => out({ type: 'connected', socket_id: pusher.connection.socket_id }));
  pusher.connection.bind('error', (error) => out({ type: 'error', error }));
  pusher.bind_global((event, data) => out({ type: 'global', event, data }));
  pusher.connection.bind('message', (event) => out({ type: 'raw', ...event }));
  pusher.user.bind_global((event, data) => out({ type: 'user', event, data }));
}


function watch(channel) {
  channel.bind_global((event, data) => out({ type: 'event', channel: channel.name, event, data }));
}

const echoChannels = {};
function echoChannel(kind, name) {
  const key = kind + ':' + name;
  if (!echoChannels[key]) {
    const channel = kind === 'join' ? echo.join(name) : kind === 'private' ? echo.private(name) : echo.channel(name);
    const report = (what) => (data) => out({ type: 'echo', channel: name, what, data });
    channel.subscribed(report('subscribed')).error(report('error'));
    if (kind === 'join') {
      channel.here(report('here')).joining(report('joining')).leaving(report('leaving'));
    }
    echoChannels[key] = channel;
  }
  return echoChannels[key];
}

const commands = {
  subscribe: (c) => watch(pusher.subscribe(c.channel)),
  unsubscribe: (c) => pusher.unsubscribe(c.channel),
  trigger: (c) => out({ type: 'triggered', ok: pusher.channel(c.channel).trigger(c.event, c.data) }),
  send: (c) => { pusher.connection.send(c.raw); },
  user: (c) => { user = c.user; },
  signin: (c) => { if (c.as) { signinAs = c.as; } pusher.signin(); },
  disconnect: () => pusher.disconnect(),
  connect: () => pusher.connect(),
  socket_id: () => out({ type: 'socket_id', socket_id: echo ? echo.socketId() : pusher.connection.socket_id }),
  listen: (c) => echoChannel(c.kind, c.channel).listen(c.event, (data) => out({ type: 'echo', channel: c.channel, what: 'listen', event: c.event, data })),
  listenForWhisper: (c) => echoChannel(c.kind, c.channel).listenForWhisper(c.event, (data) => out({ type: 'echo', channel: c.channel, what: 'whisper', event: c.event, data })),
  whisper: (c) => { echoChannel(c.kind, c.channel).whisper(c.event, c.data); out({ type: 'whispered' }); },
  leave: (c) => echo.leave(c.channel),
  exit: () => process.exit(0),
};

start().then(() => readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const command = JSON.parse(line);
  try {
    commands[command.op](command);
  } catch (error) {
    out({ type: 'exception', op: command.op, message: String(error) });
  }
}));
process.stdin.on('end', () => process.exit(0));
