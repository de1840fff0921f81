// The admin page: posts {"clientId", "message"} as JSON to /sendMessage and shows the answer.
(function () {
  "use strict";
  var form = document.getElementById("send_form");
  var result = document.getElementById("result");

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var body = JSON.stringify({
      clientId: document.getElementById("clients").value,
      message: document.getElementById("message").value
    });
    result.textContent = "sending…";
    // location.origin, not a relative URL: a page opened as http://user:pass@host/admin
    // would lend its credentials to a relative URL, and fetch refuses those.
    fetch(location.origin + "/sendMessage", {method: "POST", headers: {"Content-Type": "application/json"}, body: body})
      .then(function (response) { return response.json(); })
      .then(function (data) {
        result.textContent = data.error ? "Error: " + data.message : "Message sent";
      })
      .catch(function (error) {
        result.textContent = "Error: " + error;
      });
  });
})();
