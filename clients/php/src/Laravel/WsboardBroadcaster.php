<?php

declare(strict_types=1);

namespace Wsboard\Laravel;

use Illuminate\Broadcasting\Broadcasters\Broadcaster;
use Illuminate\Broadcasting\Broadcasters\UsePusherChannelConventions;
use Illuminate\Support\Arr;
use Symfony\Component\HttpKernel\Exception\AccessDeniedHttpException;
use Wsboard\Client;

/**
 * Laravel's broadcasting over wsboard's control socket. In a service provider:
 *
 *     Broadcast::extend('wsboard', fn ($app, array $config) =>
 *         new \Wsboard\Laravel\WsboardBroadcaster(new \Wsboard\Client($config['socket'] ?? null)));
 *
 * and in config/broadcasting.php: 'wsboard' => ['driver' => 'wsboard', 'socket' => '/run/wsboard/wsboard.sock'].
 * An event goes to its channels as one text frame, {"event": ..., "data": ...}; toOthers()
 * leaves out the socket whose wsboard connection id the request's X-Socket-ID carries
 * (wsboard.js's client.connectionId). Channel authorization follows Laravel's Pusher-style
 * conventions, as its Redis broadcaster does; with --secret, private- and presence- channels
 * also need the token in the socket's URL (Client::signedQuery).
 */
class WsboardBroadcaster extends Broadcaster
{
    use UsePusherChannelConventions;

    private const CONNECTION_ID = '/\A[0-9]{1,20}\.[0-9]{1,20}\z/';

    public function __construct(private Client $client)
    {
    }

    public function auth($request)
    {
        $channelName = $this->normalizeChannelName($request->channel_name);
        if (empty($request->channel_name)
            || ($this->isGuardedChannel($request->channel_name) && !$this->retrieveUser($request, $channelName))) {
            throw new AccessDeniedHttpException();
        }
        return parent::verifyUserCanAccessChannel($request, $channelName);
    }

    public function validAuthenticationResponse($request, $result)
    {
        if (is_bool($result)) {
            return json_encode($result);
        }
        $user = $this->retrieveUser($request, $this->normalizeChannelName($request->channel_name));
        $id = method_exists($user, 'getAuthIdentifierForBroadcasting')
            ? $user->getAuthIdentifierForBroadcasting()
            : $user->getAuthIdentifier();
        return json_encode(['channel_data' => ['user_id' => $id, 'user_info' => $result]]);
    }

    public function broadcast(array $channels, $event, array $payload = [])
    {
        if (empty($channels)) {
            return;
        }
        $socket = Arr::pull($payload, 'socket');
        $except = is_string($socket) && preg_match(self::CONNECTION_ID, $socket) ? $socket : null;
        $message = json_encode(['event' => $event, 'data' => $payload], JSON_THROW_ON_ERROR);
        $this->client->publish($this->formatChannels($channels), $message, $except);
    }
}
