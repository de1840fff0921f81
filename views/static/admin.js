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
    fetch("/sendMessage", {method: "POST", headers: {"Content-Type": "application/json"}, body: body})
      .then(function (response) { return response.json(); })
      .then(function (data) {
        result.textContent = data.error ? "Error: " + data.message : "Message sent";
      })
      .catch(function (error) {
        result.textContent = "Error: " + error;
      });
  });
})();
