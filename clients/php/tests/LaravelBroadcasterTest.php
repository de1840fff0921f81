<?php

declare(strict_types=1);

namespace Wsboard\Tests;

use Illuminate\Broadcasting\PrivateChannel;
use PHPUnit\Framework\TestCase;
use Wsboard\Client;
use Wsboard\Laravel\WsboardBroadcaster;

/** The Laravel driver, on Debian's php-illuminate-broadcasting, against a real wsboard. */
final class LaravelBroadcasterTest extends TestCase
{
    public function testAnEventReachesItsChannelsAndToOthersLeavesTheSenderOut(): void
    {
        require_once 'Illuminate/Broadcasting/autoload.php';
        $port = (int) getenv('WSBOARD_TEST_PORT');
        $tag = (string) getmypid();
        $sender = new Browser($port, "id=sender-$tag&channel=room-$tag");
        $other = new Browser($port, "id=other-$tag&channel=private-orders-$tag");
        $client = new Client();
        $conns = array_column($client->channel("room-$tag"), 'conn', 'id');
        $broadcaster = new WsboardBroadcaster($client);

        $broadcaster->broadcast(["room-$tag", new PrivateChannel("orders-$tag")], 'OrderShipped', ['order' => 5]);
        $expected = '{"event":"OrderShipped","data":{"order":5}}';
        $this->assertSame($expected, $sender->receive());
        $this->assertSame($expected, $other->receive());

        // toOthers(): Laravel puts the X-Socket-ID header in the payload as "socket".
        $broadcaster->broadcast(["room-$tag", "private-orders-$tag"], 'Ping', ['socket' => $conns["sender-$tag"]]);
        $this->assertSame('{"event":"Ping","data":[]}', $other->receive());
        $this->assertTrue($client->send("sender-$tag", 'sentinel'));
        $this->assertSame('sentinel', $sender->receive());  // never the Ping it sent
    }
}
