// A WebRTC call from the `gsavatar live` page: the microphone as the call's audio, the avatar's
// video and audio back in a <video> over the page. Signalling goes over the live WebSocket
// (__WS_PORT__); the page inlines this file into the button's onclick, like page.js.
(function (button) {
  var state = window.gsavatarCall;
  if (state && state.running) { state.stop(); return; }
  state = window.gsavatarCall = { running: true, framesShown: 0, errors: [] };
  var status = document.getElementById("gsavatar-live-status");
  function say(text) { if (status) status.textContent = text; }
  var ws = new WebSocket("ws://" + location.hostname + ":__WS_PORT__");
  var pc = new RTCPeerConnection({ iceServers: [] });
  var video = document.createElement("video");
  video.id = "gsavatar-live-video";
  video.autoplay = true;
  video.playsInline = true;
  video.style.cssText = "position:fixed;left:0;top:0;z-index:5;background:#000;height:100vh;max-width:100vw;";
  document.body.appendChild(video);
  var mic = null;
  button.textContent = "Hang up";
  state.stop = function () {
    state.running = false;
    try { ws.send(JSON.stringify({ type: "end" })); } catch (e) {}
    pc.close();
    if (mic) mic.getTracks().forEach(function (t) { t.stop(); });
    button.textContent = "Start a WebRTC call";
    say("call ended");
  };
  pc.ontrack = function (ev) {
    if (!video.srcObject) video.srcObject = ev.streams[0] || new MediaStream();
    if (!ev.streams[0]) video.srcObject.addTrack(ev.track);
    if (ev.track.kind === "video" && video.requestVideoFrameCallback) {
      var count = function () { state.framesShown += 1; if (state.running) video.requestVideoFrameCallback(count); };
      video.requestVideoFrameCallback(count);
    }
  };
  ws.onmessage = function (ev) {
    var msg = JSON.parse(ev.data);
    if (msg.type === "webrtc-answer") { pc.setRemoteDescription({ type: "answer", sdp: msg.sdp }); say("in a call: speak"); }
    else if (msg.type === "error") { state.errors.push(msg.message); say("server: " + msg.message); }
  };
  ws.onopen = function () {
    navigator.mediaDevices.getUserMedia({ audio: true }).then(function (s) {
      mic = s;
      s.getAudioTracks().forEach(function (t) { pc.addTrack(t, s); });
      pc.addTransceiver("video", { direction: "recvonly" });
      return pc.createOffer();
    }).then(function (offer) {
      return pc.setLocalDescription(offer);
    }).then(function () {
      return new Promise(function (done) {
        if (pc.iceGatheringState === "complete") return done();
        pc.onicegatheringstatechange = function () { if (pc.iceGatheringState === "complete") done(); };
      });
    }).then(function () {
      ws.send(JSON.stringify({ type: "webrtc-offer", sdp: pc.localDescription.sdp }));
      say("calling...");
    }).catch(function (e) { state.errors.push(String(e)); say("call failed: " + e.message); });
  };
  ws.onclose = function () { if (state.running) { state.stop(); say("disconnected"); } };
})(this);
