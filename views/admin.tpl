<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>wsboard admin</title>
  <link rel="stylesheet" href="/static/wsboard.css">
</head>
<body>
  <h2>Clients</h2>
  % if clients:
  <table id="client_table">
    <thead><tr><th>Client id</th><th>Host</th></tr></thead>
    <tbody>
    % for client in clients:
      <tr><td>{{client.client_id}}</td><td>{{client.peer}}</td></tr>
    % end
    </tbody>
  </table>
  % else:
  <p id="no_clients">No client is connected. Reload this page to see new ones.</p>
  % end
  <form id="send_form">
    <label for="clients">Send to</label>
    <select id="clients" name="clientId" required>
    % for client_id in dict.fromkeys(c.client_id for c in clients):
      <option value="{{client_id}}">{{client_id}}</option>
    % end
    </select>
    <h2><label for="message">Message</label></h2>
    <textarea id="message" name="message" rows="4" cols="60"></textarea>
    <p><button id="send_message" type="submit">Send Message</button></p>
    <p id="result" role="status"></p>
  </form>
  <h2>Channels</h2>
  % if channels:
  <table id="channel_table">
    <thead><tr><th>Channel</th><th>Sockets</th><th>Members</th></tr></thead>
    <tbody>
    % for name, count, members in channels:
      <tr><td>{{name}}</td><td>{{count}}</td><td>{{", ".join(m["id"] for m in members) if members is not None else ""}}</td></tr>
    % end
    </tbody>
  </table>
  % else:
  <p id="no_channels">No socket is in a channel.</p>
  % end
  <form id="publish_form">
    <label for="channel">Publish to channel</label>
    <input id="channel" name="channel" required maxlength="164" pattern="[A-Za-z0-9_\-=@,.;]+"
           list="channel_names">
    <datalist id="channel_names">
    % for name, count, members in channels:
      <option value="{{name}}">
    % end
    </datalist>
    <label for="publish_message">Message</label>
    <textarea id="publish_message" name="message" rows="2" cols="60"></textarea>
    <p><button id="publish_button" type="submit">Publish</button></p>
    <p id="publish_result" role="status"></p>
  </form>
  % if refusals:
  <h2>Refused since start</h2>
  <table id="refusals">
    <thead><tr><th>Kind</th><th>Count</th></tr></thead>
    <tbody>
    % for kind, count in refusals:
      <tr><td>{{kind}}</td><td>{{count}}</td></tr>
    % end
    </tbody>
  </table>
  % end
  <script src="/static/admin.js"></script>
</body>
</html>
